"""Train a learned sparse retrieval model on any backbone (DESIGN §3).

    python train.py --cfg yamls/tiny/bert_mlm.yaml                       # one process (CPU or one GPU)
    accelerate launch --num_processes 2 train.py --cfg yamls/x.yaml      # DDP
    accelerate launch --config_file yamls/accelerate/ds_zero3_4gpu.yaml train.py --cfg yamls/x.yaml   # DeepSpeed
    python train.py --cfg yamls/x.yaml --train.resume=auto               # continue from the last checkpoint

Inputs: `model.*` (backbone, heads, decoding), `data.*` (training examples: DESIGN §3), `train.*` (loss,
regularizers, optimisation). Outputs in `runs/<exp.name>/` (or `exp.output_dir`):
    config.yaml                  the resolved config (a valid --cfg for encode.py and the rest of the chain)
    checkpoints/step-NNNNNN/     accelerate save_state folders every `train.save_every` optimizer steps, plus
                                 trainer_state.json (step, epoch, logit shift, regularizer warm-up);
                                 resuming unpickles nothing that could run code (`check_checkpoint_files`)
    final/                       SparseModel.save: HF folder(s) + lsr_config.json (+ mlp_head.safetensors)
    train_log.jsonl              one line per logged step: step, loss, reg, q/d nnz, lr
Steps, warm-ups and regularizer schedules count optimizer steps (after gradient accumulation), not micro-batches.
A NaN or infinite loss stops the run before the optimizer applies it (`check_finite`).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import DeepSpeedPlugin, set_seed
from safetensors import SafetensorError
from tqdm.auto import tqdm

from lsr_core.backbones import KINDS
from lsr_core.config import ConfigError, load_config, save_config
from lsr_core.data import collate, load_examples
from lsr_core.losses import LOSSES, NEEDS_TEACHER, REGULARIZERS, RegWeight, regularization
from lsr_core.modeling import build_model, calibrate_logit_shift
from lsr_core.utils import InputError, accelerator_kwargs, atomic_write_json, atomic_write_text, run_script

logger = get_logger(__name__)


class EpochView(torch.utils.data.Dataset):
    """The examples in a seeded order that changes per epoch, each with negatives drawn for (seed, epoch, example);
    the loader reads it sequentially, so a resumed run can skip exactly the batches already done and draws the
    same negatives after them. (Not named `set_epoch`: accelerate's loaders call
    `dataset.set_epoch(<times this loader was iterated>)`, which restarts at 0 for the loader that
    `skip_first_batches` builds on resume.)"""

    def __init__(self, examples, seed: int):
        self.examples, self.seed = examples, seed
        self.shuffle_for_epoch(0)

    def shuffle_for_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        self.order = torch.randperm(len(self.examples), generator=generator).tolist()

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples.sample(self.order[i], self.seed, self.epoch)


def uses_deepspeed(cfg) -> bool:
    """DeepSpeed from the config (`train.deepspeed`) or from the launcher (`accelerate launch --use_deepspeed`)."""
    return bool(cfg.train.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"


def make_accelerator(cfg) -> Accelerator:
    kwargs = {}
    if cfg.train.deepspeed:
        if not Path(cfg.train.deepspeed).is_file():
            raise ConfigError(f"'train.deepspeed': file not found: {cfg.train.deepspeed}")
        # single-process DeepSpeed under plain `python` still needs the launcher's variables
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": "29511"}.items():
            os.environ.setdefault(key, value)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=cfg.train.deepspeed,
                                                     gradient_accumulation_steps=cfg.train.grad_accum,
                                                     gradient_clipping=cfg.train.max_grad_norm)
    kwargs.update(accelerator_kwargs(deepspeed=uses_deepspeed(cfg)))  # several CPU processes: gloo
    return Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, mixed_precision=cfg.train.mixed_precision,
                       log_with=None if cfg.train.tracker == "none" else cfg.train.tracker,
                       project_dir=str(cfg.output_dir),
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False), **kwargs)


def make_optimizer(cfg, model, accelerator):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    ds = accelerator.state.deepspeed_plugin
    ds_config = ds.deepspeed_config if ds is not None else {}
    if "optimizer" in ds_config:  # the DeepSpeed json owns the optimizer
        from accelerate.utils import DummyOptim  # exported only where deepspeed is installed

        optimizer = DummyOptim(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    elif cfg.train.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def schedule(opt, scale: int = 1):
        name = cfg.train.scheduler if cfg.train.scheduler != "constant" else "constant_with_warmup"
        return get_scheduler(name, opt, num_warmup_steps=cfg.train.warmup_steps * scale,
                             num_training_steps=cfg.train.max_steps * scale)

    if "scheduler" in ds_config or "optimizer" in ds_config:
        from accelerate.utils import DummyScheduler

        # the DeepSpeed engine steps the schedule, once per optimizer step; with the json's optimizer but no
        # scheduler of its own, the engine builds ours on its optimizer
        scheduler = DummyScheduler(optimizer, total_num_steps=cfg.train.max_steps,
                                   warmup_num_steps=cfg.train.warmup_steps,
                                   lr_scheduler_callable=None if "scheduler" in ds_config else schedule)
    else:
        # accelerate steps a prepared scheduler once per process per optimizer step: scale to match
        scheduler = schedule(optimizer, accelerator.num_processes)
    return optimizer, scheduler


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that has its trainer_state.json. save_checkpoint writes that file last and atomically, so a
    folder without it was cut off mid-save and is skipped; one whose trainer_state.json exists but does not read is
    damaged, not incomplete, and `read_trainer_state` stops on it rather than quietly resuming further back."""
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, epoch: int, keep: int, logit_shift: float,
                    reg_weights: dict) -> None:
    path = ckpt_dir / f"step-{step:06d}"
    if accelerator.is_main_process:
        # a folder saved again (a resumed run redoing steps) is incomplete while save_state overwrites it
        (path / "trainer_state.json").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        # written last: a checkpoint without it is incomplete and skipped on resume
        atomic_write_json(path / "trainer_state.json", {
            "step": step, "epoch": epoch, "logit_shift": logit_shift,
            "reg_weights": {name: weight.state_dict() for name, weight in reg_weights.items()}})
        for old in sorted(ckpt_dir.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def read_trainer_state(folder: Path) -> dict:
    """trainer_state.json of a checkpoint, checked: step and epoch are non-negative integers, logit_shift a number
    (reg_weights are checked as they load)."""
    path = folder / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON, the checkpoint is damaged ({err})") from err
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(state).__name__}")
    for key in ("step", "epoch"):
        if type(state.get(key)) is not int or state[key] < 0:
            raise InputError(f"{path}: field '{key}' must be a non-negative integer, got {state.get(key)!r}")
    if type(state.get("logit_shift", 0.0)) not in (int, float):
        raise InputError(f"{path}: field 'logit_shift' must be a number, got {state['logit_shift']!r}")
    return state


# the classes DeepSpeed pickles into its checkpoint files (loss scaler, ZeRO stage, fp32 fragment addresses), beyond
# the tensors and containers that torch.load(weights_only=True) allows anyway
DEEPSPEED_CLASSES = {"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address"}


def check_checkpoint_files(folder: Path, process_index: int, deepspeed: bool) -> None:
    """Refuse what `accelerator.load_state` would unpickle unsafely or skip silently, before it reads anything.

    accelerate loads its files with `torch.load(weights_only=True)` (tensors and plain containers only), except
    `custom_checkpoint_*.pkl` (registered objects, full pickle: a planted file runs code), which train.py no longer
    writes, and it skips an unreadable RNG state with an info line, which would make a resumed run quietly differ.
    DeepSpeed's engine loads its own files (pytorch_model/*.pt) with full pickle: each is scanned first, without
    running it, and refused if it names any callable beyond torch's safe ones and DEEPSPEED_CLASSES."""
    from accelerate.utils import load

    pickled = sorted(folder.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise InputError(f"{pickled[0]}: train.py does not load pickled checkpoint state (unpickling can run code); "
                         "the file comes from an older train.py or from elsewhere: delete it to resume")
    for path in sorted((folder / "pytorch_model").glob("*.pt")) if deepspeed else []:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - DEEPSPEED_CLASSES
        except Exception as err:  # not torch.save's zip format, or a pickle opcode the scan does not allow
            raise InputError(f"{path}: not a checkpoint file DeepSpeed wrote ({first_line(err)})") from err
        if unsafe:
            raise InputError(f"{path}: names {sorted(unsafe)[0]}, which DeepSpeed's unpickling would call: "
                             "refused (a DeepSpeed checkpoint holds tensors and DeepSpeed's own state only)")
    rng = folder / f"random_states_{process_index}.pkl"
    if not rng.is_file():
        logger.warning(f"{rng}: not found, the random number generators are not restored (another number of "
                       "processes than the run that saved it?)")
        return
    try:
        load(rng)  # as load_state reads it: weights_only, plus numpy's array types
    except Exception as err:  # weights_only refusals, torn zip files: reported, never run
        raise InputError(f"{rng}: not a readable RNG state ({first_line(err)})") from err


def first_line(err: Exception) -> str:
    """`Type: first line of the message`: library errors (torch's unpickler) span many lines."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


class NonFiniteLoss(InputError):
    """A NaN or infinite loss. An InputError so that the scripts' handler prints it as one line: its usual causes
    are the config (learning rate, temperature) or the data of that step."""


def check_finite(accelerator, losses: list[torch.Tensor], step: int) -> None:
    """Stop before optimizer step `step` applies a non-finite loss. `losses`: [rank loss, regularizer] of each
    micro-batch of the step, left on the device so that micro-batches do not sync; read here once per optimizer step
    (one device sync, the price of stopping before the update) and gathered, so that every process stops together."""
    values = torch.stack(losses)[None]  # [1, micro-batches, 2]
    if accelerator.num_processes > 1:
        values = accelerator.gather(values)  # [processes, micro-batches, 2]
    if bool(torch.isfinite(values).all()):
        return
    process, micro, part = (~torch.isfinite(values)).nonzero()[0].tolist()
    where = f" on process {process}" if accelerator.num_processes > 1 else ""
    raise NonFiniteLoss(f"non-finite {('rank loss', 'regularizer')[part]} ({values[process, micro, part].item()}) at "
                        f"optimizer step {step}, micro-batch {micro + 1} of {values.shape[1]}{where}: stopped before "
                        "the optimizer applied it (lower train.lr, or check that step's data)")


def kept_log_lines(path: Path, step: int) -> list[str]:
    """The lines of train_log.jsonl up to `step` (a resumed run redoes and logs again the steps after it). A run
    killed mid-write leaves a torn last line: dropped with a warning. A bad line before the last is damage: an error."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning(f"{path}:{number}: dropped a torn last line (the run stopped while writing it)",
                               main_process_only=True)
                break
            raise InputError(f"{path}:{number}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise InputError(f"{path}:{number}: field 'step' missing or not an integer")
        if record["step"] <= step:
            kept.append(line + "\n")
    return kept


def calibrate(accelerator, model, dataset, tokenize, target: int) -> float:
    """train.calibrate_nnz: the logit shift at which the documents of the first batch (the same texts on every
    process) keep `target` terms on average, computed in eval mode (no dropout, no random numbers drawn) and
    broadcast from the main process so that every replica uses the same value."""
    from accelerate.utils import broadcast

    sparse = accelerator.unwrap_model(model)
    if sparse.spec.doc_head != "mlm":
        raise ConfigError("'train.calibrate_nnz' needs an MLM document head ('model.doc_head=mlm')")
    docs = collate([dataset[i] for i in range(min(len(dataset), 64))]).docs
    batch = {k: v.to(accelerator.device) for k, v in tokenize(docs, is_query=False).items()}
    model.eval()
    with accelerator.autocast():
        shift = calibrate_logit_shift(sparse, batch, target)
    model.train()
    return float(broadcast(torch.tensor([shift], device=accelerator.device))[0])


def main(argv=None) -> Path:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    if cfg.train.loss in NEEDS_TEACHER and not (cfg.data.teacher_scores or cfg.data.format == "jsonl"):
        raise ConfigError(f"'train.loss={cfg.train.loss}' needs teacher scores ('data.teacher_scores')")
    if cfg.model.compile != "none" and uses_deepspeed(cfg):
        raise ConfigError("'model.compile' is not supported with DeepSpeed here: leave it 'none' (or use the "
                          "DeepSpeed json's own 'compile' section)")
    accelerator = make_accelerator(cfg)
    set_seed(cfg.exp.seed)
    out = cfg.output_dir
    # read and validate everything before writing anything: bad input leaves no half-written run folder
    examples = load_examples(cfg.data, cfg.data.n_negatives, cfg.exp.seed)  # at most data.max_examples
    if cfg.train.loss in NEEDS_TEACHER and not examples.has_scores:
        raise InputError(f"'train.loss={cfg.train.loss}' needs teacher scores, and {cfg.data.train_file} has none")
    model = build_model(cfg.model, training=True)
    model.train()

    tokenize = model.tokenize  # bound now: accelerator.prepare wraps the model (DDP, DeepSpeed) and hides it

    def collate_tokenized(batch_examples):
        batch = collate(batch_examples)
        return {"q": tokenize(batch.queries, is_query=True), "d": tokenize(batch.docs, is_query=False),
                "teacher": batch.teacher_scores}

    dataset = EpochView(examples, cfg.exp.seed)
    # its own generator: each new iterator draws a worker seed from it, and from the global RNG otherwise, which a
    # resumed run (a fresh iterator mid-epoch) would draw at another point than an uninterrupted one, moving dropout
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=False, drop_last=True,
                                         collate_fn=collate_tokenized, num_workers=cfg.train.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.exp.seed))
    if len(loader) == 0:
        raise InputError(f"{len(examples)} training examples make no full batch of {cfg.train.batch_size}")
    optimizer, scheduler = make_optimizer(cfg, model, accelerator)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    q_weight = RegWeight(cfg.train.q_reg_weight, cfg.train.reg_warmup_steps)
    d_weight = RegWeight(cfg.train.d_reg_weight, cfg.train.reg_warmup_steps)
    reg_weights = {"q": q_weight, "d": d_weight}  # their state goes into trainer_state.json, not into a pickle
    loss_fn = LOSSES[cfg.train.loss]
    q_reg, d_reg = REGULARIZERS[cfg.train.q_reg], REGULARIZERS[cfg.train.d_reg]

    ckpt_dir = out / "checkpoints"
    step, epoch, skip = 0, 0, 0
    resume_from = last_checkpoint(ckpt_dir) if cfg.train.resume == "auto" else \
        (Path(cfg.train.resume) if cfg.train.resume else None)
    if resume_from is not None and not (resume_from / "trainer_state.json").is_file():
        raise InputError(f"'train.resume': {resume_from} is not a complete checkpoint")
    spec = accelerator.unwrap_model(model).spec
    if resume_from is not None:
        state = read_trainer_state(resume_from)
        check_checkpoint_files(resume_from, accelerator.process_index, uses_deepspeed(cfg))
        try:
            accelerator.load_state(str(resume_from))
        except (pickle.UnpicklingError, SafetensorError, RuntimeError, OSError, ValueError, KeyError) as err:
            raise InputError(f"{resume_from}: cannot load the checkpoint ({first_line(err)})") from err
        step, epoch = state["step"], state["epoch"]
        spec.logit_shift = state.get("logit_shift", spec.logit_shift)  # as calibrated when the run began
        for name, weight in reg_weights.items():
            # checkpoints written before the weights' state was stored here: it counts optimizer steps from 0
            try:
                weight.load_state_dict(state.get("reg_weights", {}).get(name, {"steps_done": step}))
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                raise InputError(f"{resume_from / 'trainer_state.json'}: field 'reg_weights.{name}' is not a "
                                 f"regularizer weight's state ({first_line(err)})") from err
        skip = step * cfg.train.grad_accum - epoch * len(loader)  # micro-batches already done in this epoch
        logger.info(f"resumed from {resume_from} at step {step}", main_process_only=True)
    elif cfg.train.calibrate_nnz:
        before = spec.logit_shift
        spec.logit_shift = calibrate(accelerator, model, dataset, tokenize, cfg.train.calibrate_nnz)
        logger.info(f"train.calibrate_nnz={cfg.train.calibrate_nnz}: model.logit_shift {before:g} -> "
                    f"{spec.logit_shift:.4f}", main_process_only=True)
    cfg.model.logit_shift = spec.logit_shift
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    if cfg.train.tracker != "none":
        accelerator.init_trackers(cfg.exp.name, config={k: str(v) for k, v in vars(cfg.train).items()})

    effective = cfg.train.batch_size * accelerator.num_processes * cfg.train.grad_accum
    logger.info(f"training {cfg.model.name_or_path} ({model_kind(accelerator, model)}) on {len(examples)} examples: "
                f"{cfg.train.max_steps} steps x effective batch {effective} = {cfg.train.batch_size} per device x "
                f"{accelerator.num_processes} processes x {cfg.train.grad_accum} accumulation", main_process_only=True)
    progress = tqdm(total=cfg.train.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    log_path, started = out / "train_log.jsonl", time.time()
    if accelerator.is_main_process and log_path.exists():
        # a fresh run starts a new log; a resumed one drops the steps it redoes (logged after its checkpoint)
        atomic_write_text(log_path, "".join(kept_log_lines(log_path, step) if step else []))
    gather = cfg.train.cross_device_negatives and accelerator.num_processes > 1
    losses = []  # [rank loss, regularizer] per micro-batch of the current optimizer step, for check_finite
    while step < cfg.train.max_steps:
        dataset.shuffle_for_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            with accelerator.accumulate(model):
                q_reps, d_reps = model(batch["q"], batch["d"])
                rank_loss = loss_fn(q_reps, d_reps, batch["teacher"], temperature=cfg.train.temperature,
                                    in_batch=cfg.train.in_batch_negatives, gather=gather)
                # each positive and negative counted once; train.d_reg_form: how (losses.doc_regularization)
                reg = regularization(q_reps, d_reps, q_reg, d_reg, q_weight.weight, d_weight.weight,
                                     cfg.train.d_reg_form)
                loss = rank_loss + reg
                losses.append(torch.stack([rank_loss.detach().float(),
                                           torch.as_tensor(reg).detach().float().to(rank_loss.device)]))
                if accelerator.sync_gradients:  # before backward: DeepSpeed steps the optimizer inside it
                    check_finite(accelerator, losses, step + 1)
                    losses = []
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            q_weight.step()
            d_weight.step()
            progress.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                record = {"step": step, "loss": float(rank_loss.detach()), "reg": float(reg.detach()) if torch.is_tensor(reg) else float(reg),
                          "q_nnz": float((q_reps > 0).sum(1).float().mean()),
                          "d_nnz": float((d_reps > 0).sum(1).float().mean()), "lr": scheduler.get_last_lr()[0]}
                accelerator.log(record, step=step)
                if accelerator.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{record['loss']:.4f}", d_nnz=f"{record['d_nnz']:.0f}")
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
                save_checkpoint(accelerator, ckpt_dir, step, epoch, cfg.train.keep_checkpoints, spec.logit_shift,
                                reg_weights)
            if cfg.train.stop_after and step >= cfg.train.stop_after:
                progress.close()
                logger.info(f"stopping at step {step} (train.stop_after)", main_process_only=True)
                return out
            if step >= cfg.train.max_steps:
                break
        else:
            epoch += 1
    progress.close()
    final = save_final(accelerator, model, out)
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"trained {step} steps in {time.time() - started:.1f}s; model saved to {final}")
    return final


def model_kind(accelerator, model) -> str:
    spec = accelerator.unwrap_model(model).spec
    heads = spec.query_head if spec.query_head == spec.doc_head else f"q{spec.query_head.upper()}-d{spec.doc_head.upper()}"
    plugin = accelerator.state.deepspeed_plugin
    return f"{spec.kind}, {heads}" + (f", {spec.decoding}" if len(KINDS[spec.kind].decodings) > 1 else "") + \
        (f", DeepSpeed ZeRO-{plugin.zero_stage}" if plugin is not None else "")


def save_final(accelerator, model, out: Path) -> Path:
    """Gather full weights (ZeRO-3 shards them) and save into final/ via a temp folder renamed at the end."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    full_state = accelerator.get_state_dict(model)  # collective under ZeRO-3: every rank must call it
    final, tmp = out / "final", out / "final.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        state_dicts = None
        if accelerator.state.deepspeed_plugin is not None and full_state is not None:
            state_dicts = split_state_dict(unwrapped, full_state)
        unwrapped.save(tmp, state_dicts=state_dicts, save_fn=accelerator.save)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def split_state_dict(model, full_state: dict) -> dict:
    """SparseModel state dict -> {'doc': backbone state, 'query': backbone state} with HF key names, and 'mlp':
    the MLP heads' tensors as SparseModel.save names them."""
    parts = {"mlp": {f"{role}.{name}": full_state[f"{role}_mlp.{name}"] for role in ("query", "doc")
                     for name in ("weight", "bias") if f"{role}_mlp.{name}" in full_state}}
    for role, prefix in (("doc", "doc_backbone."), ("query", "query_backbone.")):
        sub = {k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)}
        parts[role] = {k.replace("base_model.model.", ""): v for k, v in sub.items()} if sub else None
    if parts["query"] is None:
        parts["query"] = parts["doc"]
    return parts


if __name__ == "__main__":
    run_script(main)
