"""``zu-fast``: demo | stats | unlearn | apply | restore | eval | info.

Every error is one line on stderr and exit status 2 (``--debug``, anywhere on the line, shows the
traceback instead). Everything that can be checked cheaply — request file, output folders, corpus
lines, config, model folder, layers, weights — is checked before the statistics pass or any edit.
Output folders are never deleted: a non-empty one is refused unless ``--overwrite``, which replaces
only zu_fast's own files in it (``zu_fast.atomic``).

Saved edited models (``unlearn --save-model``, ``apply --out``) carry ``zu_fast_edits.json``, the
edits applied to them, oldest first. ``zu-fast restore EDIT --model DIR --out DIR`` takes a saved edit
off such a model by applying its inverse (W ← D⁻¹W, or W − ΔW) and says whether every layer came back
bit for bit (checked against the edit's base fingerprints) or only up to rounding; an edit under a
later edit of the same layers is refused, naming it. (In Python, ``Edit.restore()`` is bit-exact.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

EDITS_RECORD = "zu_fast_edits.json"  # in a saved edited model: the zu_fast edits applied to it, oldest first


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (exit status 2, as every other error)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _default_device() -> str:
    import torch

    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        return str(torch.accelerator.current_accelerator())
    return "cpu"


def _check_model_folder(path: str) -> Path:
    """A local HuggingFace model folder, or a ZuFastError saying what is missing (never a hub lookup)."""
    from .errors import ZuFastError

    p = Path(path)
    if not p.exists():
        raise ZuFastError(f"model folder {path!r} does not exist (zu-fast reads local folders only, never the hub)")
    if not p.is_dir():
        raise ZuFastError(f"model path {path!r} is a file; give the folder with config.json and the weights")
    if not (p / "config.json").exists():
        raise ZuFastError(f"{path!r} is not a HuggingFace model folder (no config.json)")
    return p


def _load_model(path: str, dtype: str, device: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .errors import ZuFastError

    _check_model_folder(path)
    torch_dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    device = device or _default_device()
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ZuFastError(f"--device {device!r}: {e}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ZuFastError(f"cannot load the model in {path!r}: {_one_line(str(e))}") from None
    try:
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as e:
        raise ZuFastError(f"--device {device!r}: cannot move the model there ({_one_line(str(e))})") from None
    return model, tok


def _config(model, args):
    from .config import UnlearnConfig
    from .errors import ZuFastError

    overrides: dict[str, Any] = {}
    if getattr(args, "layers", None):
        try:
            overrides["layers"] = [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise ZuFastError(f"--layers {args.layers!r}: expected comma-separated integers") from None
    if getattr(args, "neutral_target", None):
        overrides["neutral_target"] = args.neutral_target
    if getattr(args, "method", None):
        overrides["method"] = args.method
    if getattr(args, "fact_token", None):
        overrides["fact_token"] = args.fact_token
    if getattr(args, "quiet", False):
        overrides["progress"] = False
    if getattr(args, "strict", False):
        overrides["strict"] = True
    if getattr(args, "allow_large_change", False):
        overrides["allow_large_change"] = True
    if getattr(args, "config", None):
        return UnlearnConfig.from_json(args.config, **overrides)
    return UnlearnConfig.for_model(model, **overrides)


def _check_config_args(args) -> None:
    """--config (readable, valid), --layers (integers) and the other config flags, before the model is loaded."""
    from .config import UnlearnConfig
    from .errors import ZuFastError

    if getattr(args, "layers", None):
        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise ZuFastError(f"--layers {args.layers!r}: expected comma-separated integers") from None
        if any(x < 0 for x in layers):
            raise ZuFastError(f"--layers {args.layers!r}: layers are indices ≥ 0")
    if getattr(args, "config", None):
        p = Path(args.config)
        if not p.is_file():
            raise ZuFastError(f"config file {args.config!r} " + ("is a folder" if p.exists() else "does not exist"))
        with warnings.catch_warnings():  # (said once, when the command reads it for real)
            warnings.simplefilter("ignore")
            UnlearnConfig.from_json(args.config)  # a bad file is refused before the model is loaded


def _weights_bytes(model_dir: str) -> int:
    """The size of a model folder's weight files (what a saved copy of it needs)."""
    pats = ("*.safetensors", "*.bin", "*.pt", "*.pth")
    return sum(f.stat().st_size for pat in pats for f in Path(model_dir).glob(pat) if f.is_file())


def _check_space(out: str, model_dir: str, flag: str) -> None:
    """Refuse, before any work, an output folder whose disk cannot hold a copy of the model."""
    from .atomic import disk_full_error, free_bytes

    need = _weights_bytes(model_dir)
    free = free_bytes(out)
    if need and free is not None and free < need:
        raise disk_full_error(out, f"model ({flag})", need, before=True)


def _read_requests(path: str) -> list:
    """The records in a .jsonl (one per line) or .json (a list) file; errors name the file and line."""
    from .errors import ZuFastError
    from .requests import normalize_requests

    p = Path(path)
    if not p.is_file():
        raise ZuFastError(f"requests file {path!r} does not exist" if not p.exists() else
                          f"requests path {path!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ZuFastError(f"{path}: cannot be read ({e})") from None
    if p.suffix == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ZuFastError(f"{path}:{i + 1}: not valid JSON ({e.msg} at column {e.colno})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ZuFastError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if isinstance(records, dict):
            records = [records]
        if not isinstance(records, list):
            raise ZuFastError(f"{path}: expected a list of request records, found {type(records).__name__}")
    try:
        return normalize_requests(records)
    except ZuFastError as e:
        raise ZuFastError(f"{path}: {e}") from None


def _read_retain(path: str, templates: list[str] | None, requests: list) -> list:
    """``--retain FILE`` (records ``{prompt, subject, target_true}``, plain prompt strings or ``[prompt, answer]``
    pairs, in .jsonl or a .json list) or ``--retain subject`` with ``--retain-templates``, validated against the
    forget requests (``zu_fast.method.retain``); errors name the file and line."""
    from .errors import ZuFastError
    from .method.retain import retain_prompts

    if path == "subject":
        return retain_prompts("subject", requests, templates)
    if templates:
        raise ZuFastError("--retain-templates goes with --retain subject (the forgotten subjects' other prompts)")
    p = Path(path)
    if not p.is_file():
        raise ZuFastError(f"retain file {path!r} does not exist" if not p.exists() else
                          f"retain path {path!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ZuFastError(f"{path}: cannot be read ({e})") from None
    if p.suffix == ".jsonl":
        items = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ZuFastError(f"{path}:{i + 1}: not valid JSON ({e.msg} at column {e.colno})") from None
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ZuFastError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            raise ZuFastError(f"{path}: expected a list of retain records or prompts, found {type(items).__name__}")
    if not items:
        raise ZuFastError(f"{path}: no retain records")
    try:
        return retain_prompts(items, requests)
    except ZuFastError as e:
        raise ZuFastError(f"{path}: {e}") from None


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_model_out(out: str, model_dir: str, overwrite: bool, flag: str) -> None:
    from .atomic import check_target
    from .errors import ZuFastError

    if _same_folder(out, model_dir) or Path(out).resolve() == Path(model_dir).resolve():
        raise ZuFastError(f"{flag} {out!r} is the source model folder; zu_fast never writes over the model it read "
                          "(choose another folder)")
    check_target(out, overwrite=overwrite, what="model")


def _read_record(model_dir: str) -> list[dict[str, Any]]:
    from .atomic import read_json
    from .errors import ZuFastError

    p = Path(model_dir) / EDITS_RECORD
    if not p.exists():
        return []
    edits = read_json(p, "zu_fast edited model").get("edits")
    if not isinstance(edits, list):
        raise ZuFastError(f"{p}: corrupted, no 'edits' list")
    return edits


def _save_model(model, tok, out: str, overwrite: bool, record: list[dict[str, Any]]) -> None:
    """save_pretrained + tokenizer + the edit record, written safely (``zu_fast.atomic.write_into``)."""
    from .atomic import write_into

    def writer(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / EDITS_RECORD).write_text(json.dumps({"format_version": 1, "edits": record}, indent=2))

    seen, need = set(), 1 << 20  # tokenizer and config files: about a MiB
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta" and t.data_ptr() not in seen:  # tied weights are saved once
            seen.add(t.data_ptr())
            need += t.numel() * t.element_size()
    write_into(out, writer, overwrite=overwrite, what="model", last=[EDITS_RECORD], need_bytes=need)


def _say(args, *msg: Any) -> None:
    if not getattr(args, "quiet", False):
        print(*msg, flush=True)


# ------------------------------------------------------------------------------------ commands -----
def cmd_demo(args) -> int:
    import torch

    from . import collect_stats, metrics, unlearn
    from .config import UnlearnConfig
    from .errors import ZuFastError
    from .eval import tinylm

    most = tinylm.TinyLMConfig().world.n_people // 2  # the default world, known before training
    if not 1 <= args.n <= most:
        raise ZuFastError(f"--n {args.n}: the demo's world has {2 * most} people; forget 1 to {most} facts")
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("zu_fast demo: the project's own small model on a world of fictitious people", flush=True)
    model, tok, world = tinylm.load_or_train(progress=not args.quiet)
    records = world.records(args.n, seed=args.seed)
    for r in records:  # the forgotten people's other facts, in phrasings never trained with them: Subject-other
        r["subject_other_prompts"] = [{"prompt": f["text"], "target": f["target"]} for f in world.other_facts(r)]
    cfg = UnlearnConfig.for_model(model, progress=not args.quiet)
    print(f"model ready ({time.perf_counter() - t0:.1f} s): method {cfg.method}, edit layers {cfg.layers}; "
          f"forgetting {len(records)} facts", flush=True)
    stats = collect_stats(model, tok, world.training_texts(), cfg)
    heldout = world.heldout_texts()
    before = metrics.evaluate(model, tok, records, heldout, neutral_target=cfg.neutral_target)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    t1 = time.perf_counter()
    edit = unlearn(model, tok, records, cfg, stats=stats)
    t_unlearn = time.perf_counter() - t1
    after = metrics.evaluate(model, tok, records, heldout, neutral_target=cfg.neutral_target)
    print()
    for r in records[:3]:
        print(f"  to forget: {r['prompt'].format(r['subject'])} → {metrics.target_string(r['target_true'])}")
    print()
    print(metrics.format_table(before, after))
    print()
    print(edit.report)
    edit.restore()
    exact = all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    print(f"\nunlearning took {t_unlearn:.1f} s; restore() bit-identical: {exact}; "
          f"total {time.perf_counter() - t0:.1f} s")
    return 0 if exact else 1


def cmd_stats(args) -> int:
    from . import collect_stats
    from .atomic import check_target
    from .errors import StaleStatsError, ZuFastError
    from .stats import describe
    from .stats.corpus import read_corpus
    from .stats.store import save_stats

    _check_model_folder(args.model)
    out_is_stats = bool(args.out) and (Path(args.out) / "meta.json").exists()
    if args.out and not out_is_stats:
        check_target(args.out, overwrite=args.overwrite, what="statistics")
    if not Path(args.corpus).is_file():
        read_corpus(args.corpus)  # the error naming it
    if args.n_samples is not None and args.n_samples < 1:
        raise ZuFastError(f"--n-samples {args.n_samples}: expected an integer ≥ 1")
    _check_config_args(args)
    model, tok = _load_model(args.model, args.dtype, args.device)
    cfg = _config(model, args)
    cfg = cfg.replace(**({"mom2_n_samples": args.n_samples} if args.n_samples else {}))
    texts = read_corpus(args.corpus, cfg.stats.n_samples)  # every line checked before the statistics pass
    if args.out and (args.overwrite and Path(args.out).exists()):
        try:  # statistics of this model already there: keep them; else recompute and replace only ours
            stats = collect_stats(model, tok, texts, cfg, cache_path=args.out) if out_is_stats else None
        except (StaleStatsError, ValueError) as e:
            _say(args, f"zu-fast stats: replacing the statistics in {args.out} ({_one_line(str(e))[:200]})")
            stats = None
        if stats is None:
            stats = collect_stats(model, tok, texts, cfg, cache=False)
            save_stats(args.out, stats.layers, stats.meta, overwrite=True)
            stats.path = args.out
    else:
        stats = collect_stats(model, tok, texts, cfg, cache_path=args.out)
    if stats.path is None:  # the default cache could not take them (a full disk: said in the warning above)
        raise ZuFastError("the statistics were computed but could not be written to the cache (see the warning); "
                          "free some space there, or give --out DIR on another disk")
    print(describe(stats))
    return 0


def cmd_unlearn(args) -> int:
    from . import collect_stats, unlearn
    from .atomic import check_target
    from .errors import ZuFastError
    from .method.unlearn import _check_before_work
    from .model import edit_targets
    from .stats.collect import CorpusStats
    from .stats.corpus import read_corpus
    from .stats.store import check_stats_for_model, load_stats, read_meta

    # everything that can be wrong with the inputs, before the model is even loaded
    requests = _read_requests(args.requests)
    if _same_folder(args.out, args.model) or Path(args.out).resolve() == Path(args.model).resolve():
        raise ZuFastError(f"--out {args.out!r} is the source model folder; zu_fast never writes into the model it "
                          "read (choose another folder for the edit)")
    retain = _read_retain(args.retain, args.retain_templates, requests) if args.retain else None
    if args.retain_templates and not args.retain:
        raise ZuFastError("--retain-templates goes with --retain subject (the forgotten subjects' other prompts)")
    check_target(args.out, overwrite=args.overwrite, what="edit")
    if args.save_model:
        _check_model_out(args.save_model, args.model, args.overwrite, "--save-model")
        if _same_folder(args.save_model, args.out) or Path(args.save_model).resolve() == Path(args.out).resolve():
            raise ZuFastError(f"--save-model {args.save_model!r} and --out are the same folder; give the edited model "
                              "and the edit a folder each")
    _check_model_folder(args.model)
    if args.save_model:
        _check_space(args.save_model, args.model, "--save-model")
    if not args.corpus and not args.stats:
        raise ZuFastError("give --corpus (statistics are collected and cached) or --stats DIR")
    if args.corpus and not Path(args.corpus).is_file():
        read_corpus(args.corpus)  # the error naming it
    if args.stats and not args.corpus:
        read_meta(args.stats)  # a statistics folder, readable
    _check_config_args(args)
    model, tok = _load_model(args.model, args.dtype, args.device)
    cfg = _config(model, args)
    edit_targets(model, cfg.layers, cfg.locate)  # layers and module names
    _check_before_work(model, tok, requests, cfg)  # weights finite, requests fit the context
    if retain:
        from .method.retain import check_retain

        check_retain(retain, requests, tok, model, cfg.templates.fact_token, reserve=cfg.templates.length + 4)
    if args.corpus:  # collected once, then loaded from the cache (or --stats folder) when it matches
        texts = read_corpus(args.corpus, cfg.stats.n_samples)  # every line checked before the statistics pass
        stats = collect_stats(model, tok, texts, cfg, cache_path=args.stats)
    else:
        layers, meta = load_stats(args.stats)
        stats = CorpusStats(layers, meta, args.stats)
        check_stats_for_model(model, cfg, stats)
    edit = unlearn(model, tok, requests, cfg, stats=stats, retain=retain)
    edit.save(args.out, overwrite=args.overwrite)
    print(edit.report)
    print(f"saved edit {edit.id} to {args.out}; apply with zu-fast apply {args.out} --model DIR --out DIR, or "
          f"zu_fast.Edit.load({args.out!r}).apply(model)")
    if args.save_model:
        try:
            _save_model(model, tok, args.save_model, args.overwrite, _read_record(args.model) + [edit.summary()])
        except ZuFastError as e:
            raise ZuFastError(f"{e}. The edit itself was saved to {args.out}: zu-fast apply {args.out} --model "
                              f"{args.model} --out DIR writes the edited model later") from None
        print(f"saved edited model to {args.save_model}")
    return 0


def _check_edit_folder(path: str, out: str) -> None:
    from .errors import ZuFastError

    p = Path(path)
    if not p.is_dir() or not (p / "edit.json").is_file():
        raise ZuFastError(f"{path} is not a saved zu_fast edit folder (no edit.json)" if p.is_dir() or not p.exists()
                          else f"{path} is a file; give the folder a saved edit lives in")
    if _same_folder(out, path) or Path(out).resolve() == p.resolve():
        raise ZuFastError(f"--out {out!r} is the edit's own folder; choose another folder for the model")


def cmd_apply(args) -> int:
    from .edit import Edit

    _check_edit_folder(args.edit, args.out)
    _check_model_folder(args.model)
    _check_model_out(args.out, args.model, args.overwrite, "--out")
    _check_space(args.out, args.model, "--out")
    edit = Edit.load(args.edit)
    record = _read_record(args.model)
    model, tok = _load_model(args.model, args.dtype, args.device)
    edit.apply(model, cast=args.cast)
    for layer, how in sorted(edit.verification.items()):
        _say(args, f"layer {layer}: {how}")
    _save_model(model, tok, args.out, args.overwrite, record + [edit.summary()])
    print(f"applied {edit.name} and saved the edited model to {args.out}")
    return 0


def cmd_restore(args) -> int:
    from .edit import Edit
    from .errors import ZuFastError

    _check_edit_folder(args.edit, args.out)
    _check_model_folder(args.model)
    _check_model_out(args.out, args.model, args.overwrite, "--out")
    _check_space(args.out, args.model, "--out")
    edit = Edit.load(args.edit)
    record = _read_record(args.model)
    mine = [i for i, r in enumerate(record) if r.get("id") == edit.id]
    if mine:
        later = [r for r in record[mine[-1] + 1:] if set(r.get("layers") or []) & set(edit.layers)]
        if later:
            names = "; ".join(f"edit {r.get('id')} (layers {r.get('layers')})" for r in reversed(later))
            raise ZuFastError(f"cannot restore {edit.name} from {args.model}: edits applied after it change the same "
                              f"layers (newest first: {names}); restore those first")
    model, tok = _load_model(args.model, args.dtype, args.device)
    exact = edit.remove(model)
    record = [r for i, r in enumerate(record) if i not in mine[-1:]]
    _save_model(model, tok, args.out, args.overwrite, record)
    if all(exact.values()):
        print(f"removed {edit.name}: every edited layer is bit-identical to the weights it was made for; saved to "
              f"{args.out}")
    else:
        off = [layer for layer, ok in exact.items() if not ok]
        print(f"removed {edit.name} by its inverse: layers {off} are the original weights up to rounding (an inverse "
              f"cannot undo the edit's rounding; keep the original model for a bit-exact copy); saved to {args.out}")
    return 0


def cmd_eval(args, rest: list[str]) -> int:
    from .eval import harness

    return harness.main(rest)


def cmd_info(args) -> int:
    import platform

    import torch

    from . import __version__, ops

    print(f"zu_fast {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name(0)} (torch built for CUDA {torch.version.cuda})")
    else:
        print(f"CUDA: no device (torch built for CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"Triton {triton.__version__}")
    except ImportError:
        print("Triton: not installed")
    from .ops import cuda_backend

    if args.build:  # the only path that compiles anything (minutes of nvcc on a GPU machine)
        try:
            cuda_backend.load_extension()
        except Exception as e:  # reported below, in the status and the table
            print(f"CUDA extension build: failed ({str(e)[:300]})")
    print("CUDA extension: " + ", ".join(f"{k}={v}" for k, v in cuda_backend.build_status().items()))
    rows = ops.info(build=args.build)
    print()
    print(f"{'op':<24}{'backend':<10}{'devices':<12}{'available':<11}{'chosen on':<11}why not")
    for r in rows:
        avail = "unknown" if r["available"] is None else str(r["available"])
        print(f"{r['op']:<24}{r['backend']:<10}{r['device_types']:<12}{avail:<11}"
              f"{r['chosen_on'] or '-':<11}{r['why']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zu-fast", description="Fast few-shot knowledge unlearning (ZeroUnlearn). Errors: one line "
                "on stderr, exit status 2; --debug anywhere shows the traceback.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="train/load the small model, unlearn facts, print before/after, restore")
    d.add_argument("--n", type=int, default=10, help="facts to forget")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    def model_args(q, config: bool = True):
        q.add_argument("--model", required=True, help="local HF model folder")
        q.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        q.add_argument("--device", help="where to run (default: the accelerator if there is one, else cpu)")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        if config:
            q.add_argument("--config", help="UnlearnConfig JSON/YAML (ours or the reference hparams)")
            q.add_argument("--layers", help="comma-separated layers to edit (default: the model's preset)")

    def overwrite_arg(q, what: str):
        q.add_argument("--overwrite", action="store_true",
                       help=f"write into non-empty {what} folders, replacing only zu_fast's own files there")

    s = sub.add_parser("stats", help="collect and cache corpus statistics")
    model_args(s)
    s.add_argument("--corpus", required=True, help=".txt (one text per line) or .jsonl with a 'text' field")
    s.add_argument("--out", help="statistics folder (default: the cache)")
    s.add_argument("--n-samples", type=int, help="texts to read at most")
    overwrite_arg(s, "--out")

    u = sub.add_parser("unlearn", help="unlearn requests and save the edit")
    model_args(u)
    u.add_argument("--requests", required=True, help=".jsonl or .json list of {prompt, subject, target_true}")
    u.add_argument("--corpus", help="corpus for the statistics (cached)")
    u.add_argument("--stats", help="statistics folder from `zu-fast stats --out`")
    u.add_argument("--method", choices=["closed_form", "gd"], help="ZeroUnlearn (closed form) or ZeroUnlearn-GD")
    u.add_argument("--neutral-target", help="string the model should say instead (default: EOS)")
    u.add_argument("--retain", metavar="FILE|subject",
                   help="prompts whose outputs must not change: a .jsonl/.json of {prompt, subject, target_true} "
                        "records, prompt strings or [prompt, answer] pairs; or 'subject' with --retain-templates "
                        "(the forgotten subjects' other prompts)")
    u.add_argument("--retain-templates", nargs="+", metavar="TEMPLATE",
                   help="with --retain subject: prompts with {} for the subject, e.g. '{} works for' '{} speaks'")
    u.add_argument("--fact-token", choices=["subject_last", "last"],
                   help="where keys are read and z is placed: the subject's last token (the paper's default) or the "
                        "prompt's last token (tells a subject's facts apart in subject-first prompts)")
    u.add_argument("--out", required=True, help="folder for the saved edit")
    u.add_argument("--save-model", help="also save the edited model here (never the source folder)")
    u.add_argument("--strict", action="store_true",
                   help="refuse a flagged edit (targets not reached, large weight change, ...): nothing is saved")
    u.add_argument("--allow-large-change", action="store_true",
                   help="apply an edit that moves a layer beyond the hard limit (hard_limit_multiple × "
                        "max_rel_weight_change), refused otherwise")
    overwrite_arg(u, "--out/--save-model")

    a = sub.add_parser("apply", help="apply a saved edit to a model folder and save the edited model")
    a.add_argument("edit", help="folder written by `zu-fast unlearn --out` or Edit.save")
    model_args(a, config=False)
    a.add_argument("--out", required=True, help="folder for the edited model (never the source folder)")
    a.add_argument("--cast", action="store_true", help="allow a model of another dtype (e.g. a bf16 copy of the "
                   "fp32 weights the edit was made for)")
    overwrite_arg(a, "--out")

    r = sub.add_parser("restore", help="take a saved edit off a saved edited model (inverse edit; says whether "
                       "the result is bit-identical)")
    r.add_argument("edit", help="the saved edit to take off")
    model_args(r, config=False)
    r.add_argument("--out", required=True, help="folder for the restored model (never the source folder)")
    overwrite_arg(r, "--out")

    sub.add_parser("eval", help="compare methods on the synthetic world (see zu-fast eval --help)", add_help=False)
    i = sub.add_parser("info", help="versions, devices, ops and their backends (builds nothing unless --build)")
    i.add_argument("--build", action="store_true",
                   help="also build (or load) the CUDA extension to report whether it works (minutes on first use)")
    return p


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = _one_line(str(message))
    text = text[len("zu_fast: "):] if text.startswith("zu_fast: ") else text
    print(f"zu-fast: warning: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 success, 2 any error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] == "eval":  # its own parser (zu-fast eval --help), the same error contract
        args = argparse.Namespace(cmd="eval", quiet="--quiet" in argv)
        rest = argv[1:]

        def cmd(_args):
            return cmd_eval(None, rest)
    else:
        args = build_parser().parse_args(argv)
        cmd = {"demo": cmd_demo, "stats": cmd_stats, "unlearn": cmd_unlearn, "apply": cmd_apply,
               "restore": cmd_restore, "info": cmd_info}[args.cmd]
    if getattr(args, "quiet", False):
        try:  # transformers' own loading/saving bars
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
    if debug:
        return cmd(args)
    old_show = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return cmd(args)
    except KeyboardInterrupt:
        print(f"zu-fast {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (every error: one line, exit 2; --debug for the traceback)
        from .errors import ZuFastError

        what = _one_line(str(e)) or type(e).__name__
        if not isinstance(e, (ZuFastError, OSError)):
            what = f"{type(e).__name__}: {what} (an unexpected error: run with --debug for the traceback)"
        print(f"zu-fast {args.cmd}: error: {what}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = old_show


if __name__ == "__main__":
    raise SystemExit(main())
