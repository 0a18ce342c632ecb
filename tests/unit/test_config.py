"""Config: every yaml in yamls/ loads; unknown keys, wrong types and bad choices are errors naming the key;
one level of `base:`; CLI overrides beat the yaml; the accelerate and DeepSpeed files parse."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lsr_core.config import CHOICES, MINIMUM, Config, ConfigError, load_config

YAMLS = Path(__file__).resolve().parents[2] / "yamls"
EXPERIMENT_YAMLS = sorted(p for p in YAMLS.rglob("*.yaml") if "accelerate" not in p.relative_to(YAMLS).parts)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yamls_folder_is_not_empty():
    assert len(EXPERIMENT_YAMLS) >= 7, EXPERIMENT_YAMLS


@pytest.mark.parametrize("path", EXPERIMENT_YAMLS, ids=lambda p: str(p.relative_to(YAMLS)))
def test_every_yaml_loads(path):
    cfg = load_config(["--cfg", str(path)])
    assert isinstance(cfg, Config)


def test_tiny_yamls_inherit_base_and_set_their_model():
    cfg = load_config(["--cfg", str(YAMLS / "tiny" / "asym_qmlp_dmlm.yaml")])
    assert cfg.train.loss == "infonce" and cfg.train.batch_size == 4  # from base.yaml
    assert cfg.train.lr == 1e-3  # its own, over base.yaml's 3e-3
    assert (cfg.model.query_head, cfg.model.doc_head, cfg.model.shared) == ("mlp", "mlm", False)
    assert load_config(["--cfg", str(YAMLS / "tiny" / "t5_single.yaml")]).model.decoding == "single_token"
    assert load_config(["--cfg", str(YAMLS / "tiny" / "opt_lora.yaml")]).model.lora is True


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_auto_precision_follows_the_hardware(monkeypatch, caplog, native):
    """`auto` is bf16 only where bf16 is native; an explicit bf16 where it is emulated is kept, with a warning."""
    monkeypatch.setattr("lsr_core.utils.native_bf16", lambda: native)
    cfg = load_config(["--model.dtype=auto", "--train.mixed_precision=auto"])
    assert (cfg.model.dtype, cfg.train.mixed_precision) == (("bfloat16", "bf16") if native else ("float32", "no"))
    assert "emulated" not in caplog.text
    cfg = load_config(["--model.dtype=bfloat16", "--train.mixed_precision=fp16"])
    assert (cfg.model.dtype, cfg.train.mixed_precision) == ("bfloat16", "fp16")
    assert ("emulated" in caplog.text) is not native
    caplog.clear()
    cfg = load_config(["--model.dtype=bfloat16"], runs_model=False)  # index, search, evaluate compute nothing in it
    assert cfg.model.dtype == "bfloat16" and caplog.text == ""
    load_config(["--train.mixed_precision=fp16"])  # nothing asks for bf16: no probe, no warning
    assert caplog.text == ""


def test_native_bf16_reads_the_cpu_probes(monkeypatch):
    from lsr_core.utils import native_bf16

    monkeypatch.delenv("LSR_NATIVE_BF16", raising=False)  # make test sets it for the precision run: not here
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr("torch.cpu._is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr("torch.cpu._is_amx_tile_supported", lambda v=amx: v)
        assert native_bf16() is expected


@pytest.mark.parametrize("forced, expected", [("1", ("bfloat16", "bf16")), ("0", ("float32", "no"))])
def test_env_switch_forces_the_auto_resolution(monkeypatch, forced, expected):
    """LSR_NATIVE_BF16 decides `auto` whatever the CPU says (make test runs the precision tests both ways)."""
    from lsr_core.utils import native_bf16

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # the hardware says the opposite
        monkeypatch.setattr(f"torch.cpu.{probe}", lambda: forced == "0")
    monkeypatch.setenv("LSR_NATIVE_BF16", forced)
    assert native_bf16() is (forced == "1")
    cfg = load_config(["--model.dtype=auto", "--train.mixed_precision=auto"])
    assert (cfg.model.dtype, cfg.train.mixed_precision) == expected
    monkeypatch.setenv("LSR_NATIVE_BF16", "")  # empty = unset: the hardware decides again
    assert native_bf16() is (forced == "0")
    monkeypatch.setenv("LSR_NATIVE_BF16", "yes")
    with pytest.raises(ConfigError, match=r"^LSR_NATIVE_BF16 must be 0 or 1 \(or unset\), got 'yes'$"):
        load_config(["--model.dtype=auto"])


@pytest.mark.parametrize("path", sorted((YAMLS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cluster = ClusterConfig.from_yaml_file(str(path))
    assert cluster.num_processes >= 1
    ds_file = (cluster.deepspeed_config or {}).get("deepspeed_config_file")
    if ds_file:
        assert (YAMLS.parent / ds_file).is_file(), ds_file


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_deepspeed_jsons(name):
    ds = json.loads((YAMLS / "ds" / name).read_text())
    assert ds["bf16"]["enabled"] is True
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", key
    assert ds["optimizer"]["params"]["lr"] == "auto" and ds["optimizer"]["params"]["weight_decay"] == "auto"
    zero = ds["zero_optimization"]
    assert zero["stage"] == (2 if name == "zero2.json" else 3)
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # SparseModel has no `.config.hidden_size`, so accelerate cannot fill hidden-size-based "auto" values
    assert "auto" not in {v for v in zero.values() if isinstance(v, str)}


def test_unknown_key_has_did_you_mean(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  learning_rate: 0.1\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(["--cfg", str(path)])
    assert "train.learning_rate" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'.*did you mean 'max_steps'"):
        load_config(["--train.max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*did you mean 'train'"):
        load_config(["--trian.lr=3"])


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match=r"'train.batch_size' must be int, got str 'eight'"):
        load_config(["--cfg", str(path)])
    with pytest.raises(ConfigError, match=r"'model.shared' must be bool"):
        load_config(["--model.shared=maybe"])
    with pytest.raises(ConfigError, match=r"'train.lr' must be float"):
        load_config(["--train.lr=fast"])


def test_bad_choice_and_range():
    with pytest.raises(ConfigError, match=r"'train.loss' must be one of .*got 'infonse'.*did you mean 'infonce'"):
        load_config(["--train.loss=infonse"])
    with pytest.raises(ConfigError, match=r"'model.decoding' must be one of"):
        load_config(["--model.decoding=beam"])
    with pytest.raises(ConfigError, match=r"'train.batch_size' must be > 0, got 0"):
        load_config(["--train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"'train.lr' must be >= 0"):
        load_config(["--train.lr=-1e-3"])


def test_one_level_of_base(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  lr: 0.5\n  max_steps: 7\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ntrain:\n  max_steps: 9\n")
    cfg = load_config(["--cfg", str(child)])
    assert (cfg.train.lr, cfg.train.max_steps) == (0.5, 9)  # inherited, then overridden by the child

    write(tmp_path / "grand.yaml", "base: child.yaml\n")
    with pytest.raises(ConfigError, match=r"child.yaml: only one level of 'base:' is allowed"):
        load_config(["--cfg", str(tmp_path / "grand.yaml")])
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        load_config(["--cfg", str(write(tmp_path / "orphan.yaml", "base: nope.yaml\n"))])


def test_cli_override_beats_yaml(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  lr: 0.5\n  loss: kl\nmodel:\n  lora_targets: [q_proj]\n")
    cfg = load_config(["--cfg", str(path), "--train.lr=1e-4", "--model.lora_targets=q_proj,v_proj"])
    assert cfg.train.lr == 1e-4 and cfg.train.loss == "kl"
    assert cfg.model.lora_targets == ["q_proj", "v_proj"]
    # order does not matter: --cfg is read first, then the overrides in order
    cfg = load_config(["--train.lr=2e-4", "--cfg", str(path), "--train.lr=3e-4"])
    assert cfg.train.lr == 3e-4


def test_several_cfg_files_merge_in_order(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  lr: 0.5\n  max_steps: 7\n")
    model = write(tmp_path / "model.yaml", "base: base.yaml\ntrain:\n  loss: kl\n")
    method = write(tmp_path / "method.yaml", "train:\n  max_steps: 9\n  loss: infonce\n")
    cfg = load_config(["--cfg", str(model), "--cfg", str(method), "--train.lr=1e-4"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.loss) == (1e-4, 9, "infonce")  # later files win
    assert load_config(["--cfg", str(method), "--cfg", str(model)]).train.loss == "kl"


def test_choices_equal_the_code_tables():
    """Each choice the config offers is one the code implements, and the other way round (the kinds: in
    test_modeling, beside the KINDS table)."""
    from lsr_core.engines import ENGINES
    from lsr_core.losses import LOSSES, REGULARIZERS

    assert CHOICES["train.loss"] == list(LOSSES)
    assert CHOICES["train.q_reg"] == CHOICES["train.d_reg"] == list(REGULARIZERS)
    assert CHOICES["index.engine"] == list(ENGINES) and CHOICES["search.engine"] == [""] + list(ENGINES)


def test_choice_and_range_checks_come_from_the_fields():
    default = Config()
    for dotted, options in CHOICES.items():
        sec, key = dotted.split(".")
        assert getattr(getattr(default, sec), key) in options, dotted
    assert MINIMUM["train.batch_size"] == "> 0" and MINIMUM["encode.topk"] == ">= 0"
    assert MINIMUM["train.temperature"] == "> 0" and "train.max_grad_norm" not in MINIMUM


def test_config_imports_without_torch():
    code = "import sys, lsr_core.config; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        load_config(["--cfg", str(missing)])
    with pytest.raises(ConfigError, match=r"--cfg needs a file path"):
        load_config(["--cfg"])
    with pytest.raises(ConfigError, match=r"expected --section.key=value"):
        load_config(["--lr=3"])


def test_cli_strings_stay_strings():
    # YAML would read `no` as false and `query: ` as a mapping; a string key takes the text as typed
    cfg = load_config(["--train.mixed_precision=no", "--model.query_prefix=query: ", "--model.doc_prefix='passage: '",
                       "--exp.name=on"])
    assert cfg.train.mixed_precision == "no"
    assert (cfg.model.query_prefix, cfg.model.doc_prefix, cfg.exp.name) == ("query: ", "passage: ", "on")
    assert load_config(["--encode.topk=5"]).encode.topk == 5  # other types are still parsed
    with pytest.raises(ConfigError, match=r"'train.mixed_precision' must be one of"):
        load_config(["--train.mixed_precision=maybe"])


@pytest.mark.parametrize("raw, expected", [
    ("query: ", "query: "), ("a: b", "a: b"), ("[x]", "[x]"), ("{y}", "{y}"), ("- x", "- x"),  # YAML structures
    ("passage ", "passage "), (" lead", " lead"), ("a #b", "a #b"), ("&x y", "&x y"), ("|", "|"), (">", ">"),
    ("!!str x", "!!str x"), ("null", "null"), ("~", "~"), ("", ""), ("1.0", "1.0"), ("yes", "yes"),
    ("'passage: '", "passage: "), ('"q: "', "q: "), ("'it''s'", "it's"),  # one quoted string is unquoted
    ("'a' 'b'", "'a' 'b'"), ("'a", "'a"),
])
def test_cli_value_of_a_string_key_is_the_text_as_typed(raw, expected):
    assert load_config([f"--model.query_prefix={raw}"]).model.query_prefix == expected


def test_tracker_choices_are_installed():
    """A tracker offered by train.tracker is one accelerate finds installed (wandb is not in requirements.txt)."""
    import accelerate.utils

    trackers = [c for c in CHOICES["train.tracker"] if c != "none"]
    assert trackers == ["tensorboard"]
    assert all(getattr(accelerate.utils, f"is_{name}_available")() for name in trackers)
    with pytest.raises(ConfigError, match=r"'train.tracker' must be one of \['none', 'tensorboard'\], got 'wandb'"):
        load_config(["--train.tracker=wandb"])
