"""prefopt.training.hub: the model card, the portable adapter config, and `push` — against a stand-in Hub
on 127.0.0.1 (these tests never reach the network)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.config import Config
from prefopt.errors import PrefoptError
from prefopt.training import hub

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PLACEHOLDERS = ("[More Information Needed]", "TODO", "<!--")
TRAIN_ROWS = [
    {"step": 1, "loss": 0.6931, "rewards/accuracies": 0.0, "rewards/margins": 0.0, "epoch": 0.5},
    {
        "step": 2,
        "loss": 0.5123,
        "rewards/chosen": 0.2222,
        "rewards/rejected": -0.1234,
        "rewards/margins": 0.3456,
        "rewards/accuracies": 0.75,
        "epoch": 1.0,
    },
]
EVAL_ROW = {"step": 2, "eval_loss": 0.6012, "eval_rewards/accuracies": 0.625, "eval_rewards/margins": 0.0987}
SUMMARY_ROW = {"step": 2, "train_runtime": 3.21, "train_loss": 0.6027, "epoch": 1.0}


def _cfg(lora: bool, **data) -> dict:
    """A resolved config as `prefopt train` saves it, for a LoRA or a full run."""
    cfg = Config().resolved()
    cfg["lora"]["enabled"] = lora
    cfg["loss"]["beta"] = 0.1
    cfg["loss"]["label_smoothing"] = 0.0
    cfg["data"]["train"] = "pairs.jsonl"
    cfg["data"].update(data)
    cfg["train"]["output_dir"] = "runs/smol-dpo"
    cfg["train"]["lr"] = 5e-6
    return cfg


def _summary(**changes) -> dict:
    summary = {
        "output_dir": "runs/smol-dpo",
        "steps": 2,
        "train_pairs": 8,
        "eval_pairs": 2,
        "first_loss": 0.6931,
        "last_loss": 0.5123,
        "train_runtime": 3.21,
        "wall_s": 9.0,
        "bf16": False,
        "resumed_from": None,
    }
    summary.update(changes)
    return summary


def _no_placeholders(text: str) -> None:
    for bad in PLACEHOLDERS:
        assert bad not in text.split("```yaml")[0], bad  # the config block may hold YAML nulls
    assert not re.search(r"\b(None|nan)\b", text)


def test_public_base():
    assert hub.public_base("default", "/root/.cache/prefopt/models/SmolLM2") == HUB_ID
    assert hub.public_base("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub.public_base("gpt2", "gpt2") == "gpt2"
    assert hub.public_base("/data/my-model", "/data/my-model") == "/data/my-model"
    assert hub.public_base("m.gguf", "/cache/m-1234") == "/cache/m-1234"


def test_card_lora():
    card = hub.model_card(
        _cfg(True, eval_fraction=0.2),
        _summary(),
        TRAIN_ROWS + [EVAL_ROW, SUMMARY_ROW],
        base=HUB_ID,
        command="prefopt train smol.yaml --train.lr 5e-6",
        version="0.1.0",
        repo_id="alice/smol-dpo",
    )
    data = ModelCard(card).data.to_dict()
    assert data == {
        "base_model": HUB_ID,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["prefopt", "dpo", "lora"],
    }
    _no_placeholders(card)
    # the last training row's numbers, and the evaluation's
    for number in ("0.5123", "0.75", "0.3456", "0.2222", "-0.1234", "0.6012", "0.625", "0.0987"):
        assert f" {number} |" in card, number
    assert "0.6931 |" not in card  # the first row is not the final one
    assert "r = 16, alpha = 32" in card and "beta = 0.1" in card
    assert "8 for training, 2 for evaluation" in card
    assert "20% of the training data, held out" in card
    assert "learning rate 5e-06" in card
    assert f'base = AutoModelForCausalLM.from_pretrained("{HUB_ID}")' in card
    assert 'model = PeftModel.from_pretrained(base, "alice/smol-dpo")' in card
    assert "prefopt train smol.yaml --train.lr 5e-6" in card
    assert card.rstrip().endswith("Trained with prefopt 0.1.0.")
    config_block = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_block) == _cfg(True, eval_fraction=0.2)


def test_card_full_run_local_base_hub_data():
    """A full fine-tune of a local model on a Hub dataset, with no evaluation and metrics missing:
    no base_model or license is claimed, the dataset is listed, nothing unknown is printed."""
    cfg = _cfg(False, train="Anthropic/hh-rlhf")
    rows = [{"step": 3, "loss": 0.4321, "epoch": 1.0}]
    summary = _summary(eval_pairs=0, first_loss=None, train_runtime=None)
    card = hub.model_card(cfg, summary, rows, base="/data/my-model", command="prefopt train x.yaml", version="0.1.0")
    data = ModelCard(card).data.to_dict()
    assert data == {
        "datasets": ["Anthropic/hh-rlhf"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["prefopt", "dpo"],
    }
    _no_placeholders(card)
    assert " 0.4321 |" in card
    assert "reward accuracy" not in card and "evaluation" not in card.split("## Results")[1].split("##")[0]
    assert "Training time" not in card
    assert "full fine-tune" in card
    assert 'AutoModelForCausalLM.from_pretrained("runs/smol-dpo")' in card  # no repo id yet: the folder
    assert "(https://huggingface.co/datasets/Anthropic/hh-rlhf)" in card


def test_card_without_metrics_has_no_results():
    cfg = _cfg(False)
    cfg["loss"]["name"] = "simpo"
    card = hub.model_card(cfg, _summary(), [], base=HUB_ID, command="prefopt train x.yaml", version="0.1.0")
    assert "## Results" not in card
    assert ModelCard(card).data.tags == ["prefopt", "simpo"]
    assert "Reference model" not in card  # SimPO has none
    _no_placeholders(card)


# ---------------------------------------------------------------- a LoRA run folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_dir):
    """A LoRA run's output folder as `prefopt train` leaves it (a real peft adapter of the tiny model,
    with peft's template README), plus the run-internal files `push` must leave out; then fixed by
    fix_adapter_base and given its card by write_model_card."""
    out = tmp_path_factory.mktemp("lora-run")
    local = tmp_path_factory.mktemp("machine-cache") / "SmolLM2-135M-Instruct.Q4_1-0123"  # like `default`'s
    shutil.copytree(tiny_dir, local)
    base = AutoModelForCausalLM.from_pretrained(local)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora, adapter_name="default").eval()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    ids = torch.tensor([[1, 504, 3130, 314, 260, 1345, 30, 2]])
    with torch.no_grad():
        logits = model(ids).logits
        with model.disable_adapter():
            base_logits = model(ids).logits
    assert "[More Information Needed]" in (out / "README.md").read_text()  # peft's template
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(local)
    cfg = _cfg(True)
    (out / "prefopt.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS + [SUMMARY_ROW]))
    (out / "training_args.json").write_text("{}")
    for internal in ("checkpoint-2/optimizer.pt", "checkpoint-2/adapter_model.safetensors", ".partial/final/x"):
        (out / internal).parent.mkdir(parents=True, exist_ok=True)
        (out / internal).write_bytes(b"internal")
    (out / ".prefopt.lock").write_text("12345")
    (out / "merged").mkdir()
    (out / "merged" / "model.safetensors").write_bytes(b"merged")
    hub.fix_adapter_base(out, hub.public_base("default", str(local)))
    shutil.rmtree(local)  # as on another machine: the path peft recorded leads nowhere
    card = hub.write_model_card(
        out, cfg, _summary(), base=HUB_ID, command="prefopt train smol.yaml", version="0.1.0", repo_id="alice/smol"
    )
    return {
        "out": out,
        "local": str(local),
        "ids": ids,
        "logits": logits,
        "base_logits": base_logits,
        "card": card.read_text(),
    }


def test_write_model_card_replaces_peft_template(lora_run):
    card = lora_run["card"]
    assert (lora_run["out"] / "README.md").read_text() == card
    _no_placeholders(card)
    assert ModelCard(card).data.base_model == HUB_ID
    assert " 0.5123 |" in card and " 0.75 |" in card
    assert not list(lora_run["out"].glob(".*.tmp"))


def test_fix_adapter_base_rewrites_only_the_base(lora_run, tiny_dir, tmp_path):
    config = json.loads((lora_run["out"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID
    assert config["r"] == 4 and config["lora_alpha"] == 8  # the rest as peft wrote it
    # a second call changes nothing (the file is not even rewritten)
    stat = (lora_run["out"] / "adapter_config.json").stat()
    hub.fix_adapter_base(lora_run["out"], HUB_ID)
    assert (lora_run["out"] / "adapter_config.json").stat().st_mtime_ns == stat.st_mtime_ns
    # a full fine-tune: config.json's local _name_or_path becomes the hub id; other keys stay
    full = tmp_path / "full"
    shutil.copytree(tiny_dir, full)
    data = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**data, "_name_or_path": str(tiny_dir)}))
    hub.fix_adapter_base(full, HUB_ID)
    assert json.loads((full / "config.json").read_text()) == {**data, "_name_or_path": HUB_ID}
    assert not (full / "adapter_config.json").exists()


LOAD_OFFLINE = """
import sys, json, torch
from huggingface_hub import constants
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM
adapter, unfixed, ids, dest = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3])), sys.argv[4]
assert constants.HF_HUB_OFFLINE
try:  # the adapter as peft saved it names a path of the training machine: no loading it here
    AutoPeftModelForCausalLM.from_pretrained(unfixed)
    unfixed_loads = True
except Exception:
    unfixed_loads = False
base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
plain = PeftModel.from_pretrained(base, adapter).eval()
auto = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()  # the base named in adapter_config.json
with torch.no_grad():
    torch.save({"plain": plain(ids).logits, "auto": auto(ids).logits, "unfixed_loads": unfixed_loads}, dest)
"""


def _hub_cache(home: Path, repo_id: str, files: Path) -> None:
    """A huggingface_hub cache entry for `repo_id` under HF_HOME `home` holding the files of folder `files`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)


def test_adapter_loads_offline_from_the_hub_id(lora_run, tiny_dir, tmp_path):
    """On a machine where only the hub id resolves (offline, the base model in the Hub cache under
    that id), plain peft loads the adapter, and gives the logits of the adapter on the tiny model."""
    home = tmp_path / "hf-home"
    _hub_cache(home, HUB_ID, Path(tiny_dir))
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run["out"], adapter, ignore=shutil.ignore_patterns("checkpoint-*", ".partial", "merged"))
    unfixed = tmp_path / "unfixed"
    shutil.copytree(adapter, unfixed)
    config = json.loads((unfixed / "adapter_config.json").read_text())
    (unfixed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": lora_run["local"]}))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    dest = tmp_path / "logits.pt"
    ids = json.dumps(lora_run["ids"].tolist())
    args = [sys.executable, "-c", LOAD_OFFLINE, str(adapter), str(unfixed), ids, str(dest)]
    result = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(dest)
    assert got["unfixed_loads"] is False
    for how in ("plain", "auto"):
        torch.testing.assert_close(got[how], lora_run["logits"], rtol=0, atol=1e-6)
    assert not torch.allclose(lora_run["logits"], lora_run["base_logits"], atol=1e-3)  # the adapter matters


# ---------------------------------------------------------------- push, against a stand-in Hub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.server.stand_in.answer(self)

    do_GET = do_POST

    def log_message(self, *args):
        pass


class StandInHub:
    """Just enough of the Hub's HTTP API on 127.0.0.1 for HfApi.create_repo and upload_folder: every
    file is declared a regular (inline, base64) file, so no LFS or Xet transfer is asked for. It
    records what it is sent, answers at most MAX_REQUESTS requests, and stops when its block ends.
    `deny`: every request is answered 401, as the Hub does for a bad token."""

    MAX_REQUESTS = 40
    OID = "f" * 40

    def __init__(self, deny: bool = False):
        self.deny = deny
        self.requests, self.created, self.files, self.validated = [], [], {}, []
        self.server = HTTPServer(("127.0.0.1", 0), _Handler)
        self.server.stand_in = self
        self.server.timeout = 0.1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.server_close()

    def _serve(self):
        while not self._stop.is_set() and len(self.requests) < self.MAX_REQUESTS:
            self.server.handle_request()

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        path = urlsplit(h.path).path
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        self.requests.append((h.command, path, h.headers.get("Authorization")))
        if self.deny:
            return self._reply(h, 401, {"error": "Invalid credentials in Authorization header"})
        if h.command == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            self.created.append(payload)
            return self._reply(h, 200, {"url": f"{self.endpoint}/{payload['organization']}/{payload['name']}"})
        if h.command == "POST" and path == "/api/validate-yaml":
            self.validated.append(json.loads(body)["content"])
            return self._reply(h, 200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/main", path)
        if h.command == "POST" and m and m.group(2) == "preupload":
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in json.loads(body)["files"]
            ]
            return self._reply(h, 200, {"files": files})
        if h.command == "POST" and m:
            return self._commit(h, m.group(1), body)
        return self._reply(h, 404, {"error": f"the stand-in Hub does not serve {h.command} {path}"})

    def _commit(self, h, repo_id: str, body: bytes) -> None:
        import base64

        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] != "header":
                assert item["key"] == "file", item  # regular files only: no LFS / Xet
                self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        url = f"{self.endpoint}/{repo_id}/commit/{self.OID}"
        self._reply(h, 200, {"success": True, "commitOid": self.OID, "commitUrl": url})

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_push_uploads_the_model_not_the_run_internals(lora_run, online):
    out = lora_run["out"]
    with StandInHub() as stand_in:
        url = hub.push(out, "alice/smol", private=True, token="x", endpoint=stand_in.endpoint)
    assert url == f"{stand_in.endpoint}/alice/smol"
    assert stand_in.created == [{"name": "smol", "organization": "alice", "visibility": "private"}]
    assert sorted(stand_in.files) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
        "metrics.jsonl",
        "prefopt.yaml",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_args.json",
    ]
    assert stand_in.files["README.md"].decode() == lora_run["card"]
    assert stand_in.validated and set(stand_in.validated) == {lora_run["card"]}  # README checked before upload
    assert stand_in.files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    assert json.loads(stand_in.files["adapter_config.json"])["base_model_name_or_path"] == HUB_ID
    assert all(auth == "Bearer x" for _, _, auth in stand_in.requests)


def test_push_refused_by_the_hub_names_the_repo(lora_run, online):
    with StandInHub(deny=True) as stand_in:
        with pytest.raises(PrefoptError) as e:
            hub.push(lora_run["out"], "alice/smol", token="bad", endpoint=stand_in.endpoint)
    message = str(e.value)
    assert "'alice/smol'" in message and "401" in message
    assert "huggingface-cli login" in message and "HF_TOKEN" in message
    assert str(lora_run["out"]) in message and "\n" not in message
    assert stand_in.requests and not stand_in.files


def test_push_without_a_token_says_how_to_log_in(lora_run, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(PrefoptError, match=r"no Hugging Face token .*'alice/smol'.*huggingface-cli login.*HF_TOKEN"):
        hub.push(lora_run["out"], "alice/smol")


def test_push_with_no_hub_to_reach(lora_run, online):
    with StandInHub() as stand_in:
        endpoint = stand_in.endpoint
    with pytest.raises(PrefoptError, match=r"'alice/smol'.*could not be reached"):
        hub.push(lora_run["out"], "alice/smol", token="x", endpoint=endpoint)  # nothing listens there now
