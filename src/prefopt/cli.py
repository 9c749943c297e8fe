"""`prefopt` command line: train | data check | demo | report.

    prefopt train CONFIG.yaml [--resume] [--section.key value ...]
                                                          dotted flags override the YAML; --resume
                                                          continues from the newest checkpoint
    prefopt data check PATH [--config CONFIG.yaml] [--json] [--section.key value ...]
                                                          what is in a data file, what is wrong with it
    prefopt demo [--out DIR]                              the offline controlled-sentiment demo
    prefopt report OUTDIR [--out DEST]                    HTML page with the plots of a run's metrics.jsonl

Bad input (config, data, model path) prints one paragraph naming the file/line or key and exits
with code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Before torch is imported: OpenMP spin-waiting makes torch several times slower on a busy CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefopt", description="Preference optimisation (DPO and family) for causal LMs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config; --section.key value overrides it")
    t.add_argument("config", nargs="?", help="YAML config file (optional when every key is given as a flag)")
    t.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="--resume (continue from the newest complete checkpoint in train.output_dir) and "
                   "--section.key value ...")
    data = sub.add_parser("data", help="inspect preference data").add_subparsers(dest="data_command", required=True)
    c = data.add_parser("check", help="report shape, counts, token lengths and problems of a data file; exit 2 "
                        "when it is not usable")
    c.add_argument("path", help="data file, save_to_disk folder or hub id")
    c.add_argument("--config", help="YAML config whose model (tokenizer) and data options apply")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    d = sub.add_parser("demo", help="offline controlled-sentiment DPO demo on the embedded model")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a tiny run to check the machinery (not a result)")
    r = sub.add_parser("report", help="write an HTML report (plots + summary) of a run's metrics.jsonl")
    r.add_argument("outdir", help="the run's output folder")
    r.add_argument("--out", default=None, help="report folder (default: OUTDIR/report)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["train"] and len(argv) > 1 and argv[1].startswith("--") and argv[1] not in ("--help", "-h"):
        argv.insert(1, "")  # no config file: every key comes from flags
    if argv[:2] == ["data", "check"]:
        args, rest = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
        rest = getattr(args, "overrides", [])
    # under torchrun / accelerate launch only rank 0 reports progress; every rank reports problems
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="prefopt: %(message)s" if rank == 0 else f"prefopt[rank {rank}]: %(message)s",
                        stream=sys.stderr)
    from .errors import PrefoptError

    try:
        if args.command == "train":
            from . import config
            from .train import train

            resume = "--resume" in rest
            cfg = config.load(args.config or None, [a for a in rest if a != "--resume"])
            summary = train(cfg, resume=resume)
            if "interrupted" in summary:
                print(f"stopped at step {summary['interrupted']}; checkpoint saved in {summary['checkpoint']}; "
                      "continue with --resume", file=sys.stderr)
                return 130
            if rank == 0:
                print(f"trained {summary['steps']} steps; model saved in {summary['output_dir']}")
            return 0
        if args.command == "data":
            return _data_check(args, rest)
        if args.command == "demo":
            from .demo import run_demo

            run_demo(out=args.out, seed=args.seed, quick=args.quick)
            return 0
        if args.command == "report":
            from .report import write_report

            print(write_report(args.outdir, args.out))
            return 0
    except PrefoptError as e:
        if debug:
            raise
        print(f"prefopt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefopt: interrupted", file=sys.stderr)
        return 130
    return 0


def _data_check(args, overrides: list[str]) -> int:
    import json

    from . import config
    from .data.check import check, format_report
    from .modeling import load

    cfg = config.load(args.config, overrides)
    tokenizer = load.load_tokenizer(load.resolve(cfg.model.name), cfg.model.revision, cfg.model.trust_remote_code)
    report = check(args.path, cfg.data, tokenizer, tokenizer_name=cfg.model.name)
    print(json.dumps(report, ensure_ascii=False) if args.json else format_report(report))
    return 0 if report["usable"] else 2


if __name__ == "__main__":
    sys.exit(main())
