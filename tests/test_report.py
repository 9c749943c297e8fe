"""`prefopt report`: HTML + PNG report of a run's metrics.jsonl (paired and unpaired runs, resumed
steps, config header, CLI exit codes)."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest

from prefopt import cli
from prefopt.errors import PrefoptError
from prefopt.evaluation.report import read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = """\
model: {name: HuggingFaceTB/SmolLM2-135M-Instruct, dtype: float32}
lora: {enabled: true, r: 8, alpha: 16}
data: {train: pairs.jsonl}
loss: {name: sigmoid, beta: 0.1}
reference: {precompute: true}
train: {epochs: 3.0, max_steps: -1, batch_size: 4, grad_accum: 2, lr: 5.0e-06}
"""


def paired_line(step: int, loss: float) -> dict:
    margin = 0.02 * step
    return {
        "step": step,
        "loss": loss,
        "grad_norm": 1.5 + 0.1 * math.sin(step),
        "learning_rate": 5e-6 * step / 30,
        "rewards/chosen": 0.01 * step,
        "rewards/rejected": 0.01 * step - margin,
        "rewards/margins": margin,
        "rewards/accuracies": min(1.0, 0.5 + step / 60),
        "logps/chosen": -100.0 - 0.1 * step,
        "logps/rejected": -110.0 - 0.5 * step,
        "logps/ref_chosen": -100.0,
        "logps/ref_rejected": -110.0,
        "lengths/chosen": 32.0,
        "lengths/rejected": 30.0,
        "rewards/length_corr": 0.1,
        "throughput/tokens_per_s": 850.0 + 10 * math.cos(step),
        "epoch": step / 10,
    }


def paired_lines() -> list:
    """30 steps, eval every 10; the run was resumed from step 15, so 16-20 appear twice (the first pass
    with a wrong loss), and step 30 is also logged twice."""
    lines = [paired_line(s, 0.6931 - 0.008 * (s - 1)) for s in range(1, 21)]
    lines[15:20] = [paired_line(s, 7.0) for s in range(16, 21)]
    lines += [paired_line(s, 0.6931 - 0.008 * (s - 1)) for s in range(16, 31)]
    lines.insert(-1, paired_line(30, 4.321))
    for s in (10, 20, 30):
        lines.append(
            {
                "step": s,
                "eval_loss": 0.69 - 0.005 * s,
                "eval_rewards/accuracies": 0.5 + s / 100,
                "eval_rewards/margins": 0.01 * s,
                "eval_runtime": 1.2,
                "epoch": s / 10,
            }
        )
    lines.append(
        {"step": 30, "train_runtime": 125.4, "train_samples_per_second": 1.9, "train_loss": 0.58, "epoch": 3.0}
    )
    return lines


def write_run(folder, lines, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if config:
        (folder / "prefopt.yaml").write_text(config)
    return folder


@pytest.fixture
def paired_run(tmp_path):
    return write_run(tmp_path / "run", paired_lines(), CONFIG)


def pngs_of(index):
    """The plots of the page, named as the PNG files they once were ("loss.png", ...)."""
    return sorted(f"{stem}.png" for stem in re.findall(r'<figure id="([^"]+)">', index.read_text()))


def assert_valid_pngs(index):
    """Every plot is an embedded PNG, and the page is the only file: it references no other."""
    html = index.read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == len(pngs_of(index)) > 0
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert re.findall(r'(?:src|href)="(?!data:|#)', html) == []
    assert [p.name for p in index.parent.iterdir()] == ["index.html"]
    return html


def test_paired_report(paired_run):
    index = write_report(paired_run)
    assert index == paired_run / "report" / "index.html"
    html = assert_valid_pngs(index)
    assert set(pngs_of(index)) == {
        "loss.png",
        "accuracy.png",
        "margins.png",
        "logps.png",
        "rewards.png",
        "rewards_hist.png",
        "learning_rate.png",
        "grad_norm.png",
        "throughput.png",
    }
    assert "0.6931" in html  # first loss
    assert "0.4611" in html  # last loss: the second step-30 line (0.6931 - 0.008 * 29), not 4.321
    assert "4.321" not in html
    for text in (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "sigmoid",
        "0.1",
        "r=8",
        "3.0 epochs",
        "2m 05s",
        "final eval loss",
        "suppression failure mode",
    ):
        assert text in html, text
    assert str(paired_run.resolve()) in html
    assert "http" not in html and "<script" not in html  # self-contained


def test_last_occurrence_of_a_step_wins(paired_run):
    rows = read_metrics(paired_run / "metrics.jsonl")
    steps = [r["step"] for r in rows["train"]]
    assert steps == list(range(1, 31))
    assert all(r["loss"] < 1 for r in rows["train"])
    assert [r["step"] for r in rows["eval"]] == [10, 20, 30] and len(rows["summary"]) == 1


def test_dest_overrides_folder(paired_run, tmp_path):
    index = write_report(paired_run, dest=tmp_path / "elsewhere")
    assert index == tmp_path / "elsewhere" / "index.html" and not (paired_run / "report").exists()


def test_unpaired_run(tmp_path):
    lines = []
    for s in range(1, 31):
        line = {
            "step": s,
            "loss": 0.5 - 0.005 * s,
            "grad_norm": 1.0,
            "learning_rate": 1e-6,
            "rewards/desirable": 0.01 * s,
            "rewards/undesirable": -0.01 * s,
            "logps/desirable": -80.0,
            "logps/undesirable": -90.0 - 0.1 * s,
            "kl": 0.001 * s,
            "rewards/accuracies": 0.6,
        }
        if s % 7 == 0:  # a batch without undesirable examples
            del line["rewards/undesirable"], line["logps/undesirable"]
        lines.append(line)
    index = write_report(write_run(tmp_path / "kto", lines))
    assert_valid_pngs(index)
    names = set(pngs_of(index))
    assert {"unpaired_rewards.png", "kl.png", "loss.png", "accuracy.png"} <= names
    assert not names & {"margins.png", "logps.png", "rewards.png", "rewards_hist.png", "throughput.png"}


@pytest.mark.parametrize(
    "content, message", [(None, "metrics.jsonl not found"), ("", "is empty"), ("\n\n", "is empty")]
)
def test_missing_or_empty_metrics(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(PrefoptError, match=message):
        write_report(tmp_path)


def test_cli_report(paired_run, capsys):
    assert cli.main(["report", str(paired_run)]) == 0
    assert capsys.readouterr().out.strip() == str(paired_run / "report" / "index.html")


def test_cli_missing_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert cli.main(["report", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_malformed_line(tmp_path, capsys):
    run = write_run(tmp_path / "bad", paired_lines()[:6])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.69\n')
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl line 7: not valid JSON" in err and "Traceback" not in err


def test_line_without_step(tmp_path):
    write_run(tmp_path, [{"step": 1, "loss": 0.7}, {"loss": 0.6}])
    with pytest.raises(PrefoptError, match=r"metrics.jsonl line 2: .*\"step\""):
        write_report(tmp_path)


def test_cli_metrics_not_utf8(tmp_path, capsys):
    run = write_run(tmp_path / "bad", paired_lines()[:3])
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "loss": 0.6\xff}\n')
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl line 4: not UTF-8" in err and "0xff" in err and "Traceback" not in err
    assert not (run / "report").exists()


def test_cli_out_is_an_existing_file(paired_run, tmp_path, capsys):
    taken = tmp_path / "taken.html"
    taken.write_text("<p>mine</p>\n")
    assert cli.main(["report", str(paired_run), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert f"{taken}: is a file, not a folder" in err and "Traceback" not in err
    assert taken.read_text() == "<p>mine</p>\n"


def test_cli_out_under_a_file(paired_run, tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_text("mine\n")
    assert cli.main(["report", str(paired_run), "--out", str(taken / "sub")]) == 2
    assert "cannot create the report folder" in capsys.readouterr().err and taken.read_text() == "mine\n"


def test_report_never_overwrites_someone_elses_index(paired_run, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html><title>my site</title></html>\n")
    with pytest.raises(PrefoptError, match="is not a prefopt report"):
        write_report(paired_run, site)
    assert (site / "index.html").read_text() == "<html><title>my site</title></html>\n"
    first = write_report(paired_run)
    assert write_report(paired_run) == first  # its own report is rewritten
