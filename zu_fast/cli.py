"""``zu-fast``: demo | stats | unlearn | eval | info."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _load_model(path: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


def _config(model, args):
    from .config import UnlearnConfig

    overrides = {}
    if getattr(args, "layers", None):
        overrides["layers"] = [int(x) for x in args.layers.split(",")]
    if getattr(args, "neutral_target", None):
        overrides["neutral_target"] = args.neutral_target
    if args.config:
        return UnlearnConfig.from_json(args.config, **overrides)
    return UnlearnConfig.for_model(model, **overrides)


def cmd_demo(args) -> int:
    import torch

    from . import collect_stats, unlearn
    from .config import UnlearnConfig
    from .eval import metrics, tinylm

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("zu_fast demo: the project's own small model on a world of fictitious people", flush=True)
    model, tok, world = tinylm.load_or_train(progress=True)
    records = world.records(args.n, seed=args.seed)
    cfg = UnlearnConfig.for_model(model)
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
        print(f"  to forget: {r['prompt'].format(r['subject'])} → {metrics._target_str(r['target_true'])}")
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
    from .stats import describe

    model, tok = _load_model(args.model, args.dtype)
    cfg = _config(model, args)
    cfg = cfg.replace(**({"mom2_n_samples": args.n_samples} if args.n_samples else {}))
    stats = collect_stats(model, tok, args.corpus, cfg, cache_path=args.out)
    print(describe(stats))
    return 0


def cmd_unlearn(args) -> int:
    from . import collect_stats, unlearn

    model, tok = _load_model(args.model, args.dtype)
    cfg = _config(model, args)
    path = Path(args.requests)
    if path.suffix == ".jsonl":
        requests = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        requests = json.loads(path.read_text())
    if args.corpus:  # collected once, then loaded from the cache (or --stats folder) when it matches
        stats = collect_stats(model, tok, args.corpus, cfg, cache_path=args.stats)
    elif args.stats:
        from .stats.collect import CorpusStats, stats_model_fingerprint
        from .stats.store import load_stats

        layers, meta = load_stats(args.stats, expect={"model_fingerprint": stats_model_fingerprint(model, cfg)})
        stats = CorpusStats(layers, meta, args.stats)
    else:
        print("zu-fast unlearn: give --corpus (statistics are collected and cached) or --stats DIR", file=sys.stderr)
        return 2
    edit = unlearn(model, tok, requests, cfg, stats=stats)
    edit.save(args.out)
    print(edit.report)
    print(f"saved edit to {args.out}; apply with zu_fast.Edit.load({args.out!r}).apply(model)")
    if args.save_model:
        model.save_pretrained(args.save_model)
        tok.save_pretrained(args.save_model)
        print(f"saved edited model to {args.save_model}")
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
    try:
        from .ops.cuda_backend import build_status

        print("CUDA extension: " + ", ".join(f"{k}={v}" for k, v in build_status().items()))
    except (ImportError, AttributeError):
        pass
    rows = ops.info()
    print()
    print(f"{'op':<24}{'backend':<10}{'devices':<12}{'available':<11}{'chosen on':<11}why not")
    for r in rows:
        print(f"{r['op']:<24}{r['backend']:<10}{r['device_types']:<12}{str(r['available']):<11}"
              f"{r['chosen_on'] or '-':<11}{r['why']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zu-fast", description="Fast few-shot knowledge unlearning (ZeroUnlearn)")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="train/load the small model, unlearn facts, print before/after, restore")
    d.add_argument("--n", type=int, default=10, help="facts to forget")
    d.add_argument("--seed", type=int, default=0)

    def model_args(q):
        q.add_argument("--model", required=True, help="local HF model folder")
        q.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        q.add_argument("--config", help="UnlearnConfig JSON/YAML (ours or the reference hparams)")
        q.add_argument("--layers", help="comma-separated layers to edit (default: the model's preset)")

    s = sub.add_parser("stats", help="collect and cache corpus statistics")
    model_args(s)
    s.add_argument("--corpus", required=True, help=".txt (one text per line) or .jsonl with a 'text' field")
    s.add_argument("--out", help="statistics folder (default: the cache)")
    s.add_argument("--n-samples", type=int, help="texts to read at most")

    u = sub.add_parser("unlearn", help="unlearn requests and save the edit")
    model_args(u)
    u.add_argument("--requests", required=True, help=".jsonl or .json list of {prompt, subject, target_true}")
    u.add_argument("--corpus", help="corpus for the statistics (cached)")
    u.add_argument("--stats", help="statistics folder from `zu-fast stats --out`")
    u.add_argument("--neutral-target", help="string the model should say instead (default: EOS)")
    u.add_argument("--out", required=True, help="folder for the saved edit")
    u.add_argument("--save-model", help="also save the edited model here")

    sub.add_parser("eval", help="compare methods on the synthetic world (see zu-fast eval --help)", add_help=False)
    sub.add_parser("info", help="versions, devices, ops and their backends")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "eval":
        return cmd_eval(None, argv[1:])
    args = parser.parse_args(argv)
    return {"demo": cmd_demo, "stats": cmd_stats, "unlearn": cmd_unlearn, "info": cmd_info}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
