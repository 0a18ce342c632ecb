"""Write a model card for a trained run and upload its model folder to the Hugging Face Hub.

    python push_to_hub.py --run runs/demo/trained --repo user/splade-tiny-wiki [--private] [--dry-run]

What it reads and writes: lsr_core/hub.py's docstring (`python -m lsr_core.hub` is the same command).
"""
from lsr_core.hub import main
from lsr_core.utils import run_script

if __name__ == "__main__":
    run_script(main)
