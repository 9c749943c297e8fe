"""`prefopt` command line: train | data check | eval | score | demo | frontier | rounds | report.

    prefopt train CONFIG.yaml [--resume [--force] | --overwrite] [--section.key value ...]
                                                          dotted flags override the YAML; --resume
                                                          continues from the newest checkpoint (same
                                                          config and data, or --force); --overwrite
                                                          replaces another run's outputs in the folder
    prefopt grpo [CONFIG.yaml] [--resume [--force] | --overwrite] [--section.key value ...]
                                                          GRPO: sample G completions per prompt from the
                                                          policy, score them with grpo.reward, train
    prefopt data check PATH [--config CONFIG.yaml] [--json] [--section.key value ...]
                                                          what is in a data file, what is wrong with it
    prefopt eval --model OUT --data PATH [--json]         the trained model as a reward model on preference
                                                          data: implicit-reward accuracy and margins beside
                                                          the reference's likelihood ranking
    prefopt eval --model OUT --prompts PATH [--reward NAME] [--samples N] [--max-new-tokens N] [--seed N] [--json]
                                                          sample policy and reference, compare their rewards
    prefopt score --model OUT --data PATH [--out FILE]    JSONL of the implicit reward of every response
                                                          (default OUT/scores/<data name>.jsonl)
    prefopt demo [--task sentiment|code] [--out DIR]      the offline demo: controlled sentiment, or Code-DPO
    prefopt frontier [CONFIG] [--quick] [--key value ...] reward vs KL over a grid of losses x beta (CSV + PNG)
    prefopt rounds [CONFIG] [--quick] [--key value ...]   on-policy rounds: sample, score, pair, train, repeat
    prefopt report OUTDIR [--out DEST]                    one HTML file with the plots of a run's metrics.jsonl
    prefopt config [SECTION]                              every config key with its default and meaning (YAML)

eval and score run no code that comes with the evaluated model unless given --trust-remote-code
(the folder's own prefopt.yaml never decides). Bad input (config, data, model path) prints one
paragraph naming the file/line or key and exits with code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import yaml
from tqdm.auto import tqdm

from prefopt.errors import PrefoptError

# Before torch is imported: OpenMP spin-waiting makes torch several times slower on a busy CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class ProgressAwareHandler(logging.Handler):
    """Log lines written through tqdm, so a warning never lands in the middle of a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefopt", description="Preference optimisation (DPO and family) for causal LMs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train_and_data(sub)
    _add_eval_and_score(sub)
    _add_experiments_and_report(sub)
    _add_config(sub)
    return p


def _add_train_and_data(sub) -> None:
    t = sub.add_parser("train", help="train from a YAML config; --section.key value overrides it")
    t.add_argument("config", nargs="?", help="YAML config file (optional when every key is given as a flag)")
    t.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="--resume (continue from the newest complete checkpoint in train.output_dir; refused when the config or "
        "the data differ from the checkpoint's, unless --force), --overwrite (replace another run's model and "
        "checkpoints in train.output_dir) and --section.key value ...",
    )
    g = sub.add_parser(
        "grpo", help="GRPO: sample groups from the policy, score them with a reward, train (config section grpo:)"
    )
    g.add_argument(
        "config", nargs="?", help="YAML config (optional: the default is the code task with its tests reward)"
    )
    g.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="--resume, --overwrite, --force and --section.key value ..."
    )
    data = sub.add_parser("data", help="inspect preference data").add_subparsers(dest="data_command", required=True)
    c = data.add_parser(
        "check", help="report shape, counts, token lengths and problems of a data file; exit 2 when it is not usable"
    )
    c.add_argument("path", help="data file, save_to_disk folder or hub id")
    c.add_argument("--config", help="YAML config whose model (tokenizer) and data options apply")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _add_eval_and_score(sub) -> None:
    trust = (
        "run Python code that comes with the model (auto_map in its config.json); off by default, and the "
        "model.trust_remote_code of the evaluated folder's prefopt.yaml is ignored: only you decide"
    )
    e = sub.add_parser(
        "eval",
        help="evaluate a trained model: implicit rewards on preference data (--data), or "
        "samples scored by a reward function (--prompts)",
    )
    e.add_argument("--model", required=True, metavar="OUT", help="output folder of a `prefopt train` run")
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--data",
        metavar="PATH",
        help="preference data (pairs, or completion + label), read with the run's data options",
    )
    which.add_argument(
        "--prompts",
        metavar="PATH",
        help="prompts (.txt one per line, or .jsonl with 'prompt') to sample from policy and reference",
    )
    e.add_argument("--reward", default="vader", help="reward function for --prompts (default: vader)")
    e.add_argument("--samples", type=int, default=4, help="samples per prompt for --prompts (default: 4)")
    e.add_argument("--max-new-tokens", type=int, default=32, help="for --prompts (default: 32)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed for --prompts (default: 0)")
    e.add_argument("--batch-size", type=int, default=8, help="examples per forward for --data (default: 8)")
    e.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    e.add_argument("--trust-remote-code", action="store_true", help=trust)
    s = sub.add_parser("score", help="write the implicit reward of every response of a data file as JSONL")
    s.add_argument("--model", required=True, metavar="OUT", help="output folder of a `prefopt train` run")
    s.add_argument("--data", required=True, metavar="PATH", help="preference data")
    s.add_argument("--out", default=None, metavar="FILE", help="JSONL to write (default: OUT/scores/<data name>.jsonl)")
    s.add_argument("--batch-size", type=int, default=8, help="examples per forward (default: 8)")
    s.add_argument("--trust-remote-code", action="store_true", help=trust)


def _add_config(sub) -> None:
    k = sub.add_parser("config", help="print every config key with its default and meaning, as YAML to copy")
    k.add_argument("section", nargs="?", help="one section: model, lora, data, loss, reference, train, grpo")


def _add_experiments_and_report(sub) -> None:
    for name, text in (
        ("frontier", "reward-KL frontier: a grid of losses x beta on a prompt set with a reward (CSV + PNG)"),
        ("rounds", "on-policy rounds: sample from the current policy, score, pair, train, repeat"),
    ):
        x = sub.add_parser(name, help=text)
        x.add_argument(
            "config",
            nargs="?",
            help="experiment YAML (keys: see docs/evaluation.md); default: the built-in sentiment task",
        )
        x.add_argument("--quick", action="store_true", help="a tiny run to check the machinery (not a result)")
        x.epilog = "Any experiment key can be given as --key value (a YAML value), e.g. --grid '{ipo: [0.1, 1]}'."
    d = sub.add_parser("demo", help="offline DPO demo on the embedded model: controlled sentiment, or --task code")
    d.add_argument(
        "--task",
        default="sentiment",
        choices=["sentiment", "code"],
        help="sentiment (VADER) | code (Code-DPO, unit tests)",
    )
    d.add_argument("--out", default=None, help="output folder (default: runs/demo, runs/demo-code for --task code)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a tiny run to check the machinery (not a result)")
    r = sub.add_parser("report", help="write an HTML report (plots + summary) of a run's metrics.jsonl")
    r.add_argument("outdir", help="the run's output folder")
    r.add_argument("--out", default=None, help="report folder (default: OUTDIR/report)")


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the parsed command, the --section.key / --key value overrides that follow it)."""
    if (
        argv[:1] in (["train"], ["grpo"])
        and len(argv) > 1
        and argv[1].startswith("--")
        and argv[1] not in ("--help", "-h")
    ):
        argv.insert(1, "")  # no config file: every key comes from flags
    if argv[:1] in (["frontier"], ["rounds"]) and not {"-h", "--help"} & set(argv):
        # [CONFIG] [--quick] then --key value pairs of the experiment config
        tail = argv[1:]
        config_path = tail.pop(0) if tail and not tail[0].startswith("--") else None
        args = argparse.Namespace(command=argv[0], config=config_path, quick="--quick" in tail)
        return args, [a for a in tail if a != "--quick"]
    if argv[:2] == ["data", "check"]:
        return parser.parse_known_args(argv)
    args = parser.parse_args(argv)
    return args, getattr(args, "overrides", [])


def main(argv=None) -> int:
    """Run the command in `argv` (default: the command line); returns the exit code: 0, 2 for bad
    input (one paragraph on stderr), 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args, rest = _parse(_parser(), [a for a in argv if a != "--debug"])
    # under torchrun / accelerate launch only rank 0 reports progress; every rank reports problems
    rank = int(os.environ.get("RANK", "0"))
    handler = ProgressAwareHandler()
    handler.setFormatter(
        logging.Formatter("prefopt: %(message)s" if rank == 0 else f"prefopt[rank {rank}]: %(message)s")
    )
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=[handler])
    try:
        code = COMMANDS[args.command](args, rest)
    except PrefoptError as e:
        if debug:
            raise
        print(f"prefopt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefopt: interrupted", file=sys.stderr)
        return 130
    if code == 0:
        _end_process_group()
    return code


def _end_process_group() -> None:
    """Under torchrun / accelerate launch, after a job every process finished, take the process group
    down before the interpreter exits (left to exit, gloo's threads can abort a process whose work is
    done: "terminate called without an active exception"). Not on an error: another process may
    still be inside a collective."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Each command imports what it runs when it runs: `prefopt --help` and a mistyped command answer
# at once instead of after importing torch, transformers and peft (several seconds).


TRAIN_FLAGS = ("--resume", "--overwrite", "--force")


def _train(args, rest: list[str]) -> int:
    from prefopt import config
    from prefopt.recipes.train import train

    flags = {f for f in TRAIN_FLAGS if f in rest}
    cfg = config.load(args.config or None, [a for a in rest if a not in TRAIN_FLAGS])
    if args.command == "grpo":
        from prefopt.recipes.grpo import train_grpo as train
    summary = train(cfg, resume="--resume" in flags, overwrite="--overwrite" in flags, force="--force" in flags)
    if "interrupted" in summary:
        print(
            f"stopped at step {summary['interrupted']}; checkpoint saved in {summary['checkpoint']}; "
            "continue with --resume",
            file=sys.stderr,
        )
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {summary['steps']} steps; model saved in {summary['output_dir']}")
    return 0


def _score(args, rest: list[str]) -> int:
    from prefopt.evaluation.reward_model import score_data

    _check_positive(args, ("batch_size",))
    res = score_data(
        args.model, args.data, args.out, batch_size=args.batch_size, trust_remote_code=args.trust_remote_code
    )
    acc = res["policy"].get("reward_accuracy", res["policy"].get("sign_accuracy"))
    what = "reward accuracy" if res["shape"] == "paired" else "sign accuracy"
    print(f"wrote {res['lines']} lines to {res['out']} ({what} {acc:.3f}, reward r = {res['reward']})")
    return 0


def _demo(args, rest: list[str]) -> int:
    from prefopt.experiments.demo import run_demo

    out = args.out or ("runs/demo" if args.task == "sentiment" else f"runs/demo-{args.task}")
    run_demo(out=out, seed=args.seed, quick=args.quick, task=args.task)
    return 0


def _report(args, rest: list[str]) -> int:
    from prefopt.evaluation.report import write_report

    print(write_report(args.outdir, args.out))
    return 0


def _experiment_config(args, overrides_argv: list[str]):
    """The experiment config of `prefopt frontier|rounds [CONFIG] [--quick] --key value ...`."""
    from prefopt.experiments.experiment import ExperimentConfig, as_dict, load_config

    rest = list(overrides_argv)
    overrides = {}
    while rest:
        key = rest.pop(0)
        if not key.startswith("--") or not rest:
            raise PrefoptError(f"{args.command}: expected --key value pairs, found '{key}'.")
        overrides[key[2:].replace("-", "_")] = yaml.safe_load(rest.pop(0))
    cfg = load_config(args.config, overrides)
    if args.quick:
        kept = ("model", "prompts", "reward", "out", "seed", "loss", "beta", "pairs", "rounds")
        cfg = ExperimentConfig.quick(**{k: v for k, v in as_dict(cfg).items() if k in kept})
    return cfg


def _experiment(args, overrides_argv: list[str]) -> int:
    cfg = _experiment_config(args, overrides_argv)
    if args.command == "frontier":
        from prefopt.experiments.frontier import run_frontier

        res = run_frontier(cfg)
        for r in res["rows"]:
            print(
                f"  {r['loss']:<10} beta {r['beta']:<6g} reward {r['reward_policy']:.3f} "
                f"(gain {r['reward_gain']:+.3f} ± {r['reward_se']:.2f}) at KL {r['kl_nats']:.2f} nats"
            )
        print(f"wrote {res['csv']} and {res['png']} ({res['seconds']:.0f} s)")
    else:
        from prefopt.experiments.rounds import run_rounds, table

        res = run_rounds(cfg)
        print(table(res))
        print(f"wrote {res['csv']} ({res['seconds']:.0f} s)")
    with open(f"{cfg.out}/{args.command}.json", "w") as f:
        json.dump(res, f, indent=2, default=str)
    return 0


def _check_positive(args, names: tuple) -> None:
    """A PrefoptError naming the flag of the first of `names` (argparse dests) below 1."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise PrefoptError(f"--{name.replace('_', '-')}: must be at least 1, found {value}.")


def _eval(args, rest: list[str]) -> int:
    if args.prompts is not None:
        from prefopt.evaluation.generation import format_table, run_generation_eval

        _check_positive(args, ("samples", "max_new_tokens"))
        if args.seed < 0:
            raise PrefoptError(f"--seed: must be 0 or more, found {args.seed}.")
        res = run_generation_eval(
            model_dir=args.model,
            prompts=args.prompts,
            reward=args.reward,
            samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
        )
        print(json.dumps(res, ensure_ascii=False) if args.json else format_table(res))
        return 0
    from prefopt.evaluation.reward_model import evaluate_data, format_report

    _check_positive(args, ("batch_size",))
    res = evaluate_data(args.model, args.data, batch_size=args.batch_size, trust_remote_code=args.trust_remote_code)
    print(json.dumps(res, ensure_ascii=False) if args.json else format_report(res))
    return 0


def _data_check(args, overrides: list[str]) -> int:
    from prefopt import config
    from prefopt.data.check import check, format_report
    from prefopt.modeling import load

    cfg = config.load(args.config, overrides)
    spec = config.resolve_loss(cfg.loss)  # the data must be the kind this loss trains on, as in training
    tokenizer = load.load_tokenizer(load.resolve(cfg.model.name), cfg.model.revision, cfg.model.trust_remote_code)
    report = check(args.path, cfg.data, tokenizer, tokenizer_name=cfg.model.name, loss=spec)
    print(json.dumps(report, ensure_ascii=False) if args.json else format_report(report))
    return 0 if report["usable"] else 2


def _config(args, rest: list[str]) -> int:
    from prefopt import config

    print(config.describe(args.section), end="")
    return 0


COMMANDS = {
    "train": _train,
    "grpo": _train,
    "data": _data_check,
    "eval": _eval,
    "score": _score,
    "frontier": _experiment,
    "rounds": _experiment,
    "demo": _demo,
    "report": _report,
    "config": _config,
}


if __name__ == "__main__":
    sys.exit(main())
