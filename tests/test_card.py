"""Model cards of Sieve adapters, checked field by field against independently computed values, and the Hub
upload through PEFT against a local stub of the Hub's HTTP API (huggingface_hub's httpx client, not moe-sieve)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402

from moe_sieve.adapters import SieveLoraConfig, plan_adapters  # noqa: E402
from moe_sieve.adapters.card import push_adapter_to_hub, write_run_card  # noqa: E402
from moe_sieve.adapters.peft_method import SieveConfig  # noqa: E402
from moe_sieve.arch import config_fingerprint, find_moe_layers  # noqa: E402
from moe_sieve.modeling import ModelSpec, load_model  # noqa: E402
from moe_sieve.profiling import Profile  # noqa: E402
from moe_sieve.selection import Selection  # noqa: E402

from .conftest import small_train_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def parse_card(text: str) -> tuple[dict, dict[str, dict[str, str]], dict[str, list[str]]]:
    """(YAML metadata, {section: {bullet key: value}}, {layer: [k, experts, coverage]}) of a card."""
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(header)
    sections: dict[str, dict[str, str]] = {}
    rows: dict[str, list[str]] = {}
    current = ""
    for line in body.splitlines():
        if line.startswith("## "):
            current = line[3:]
            sections[current] = {}
        elif line.startswith("- ") and ": " in line:
            key, value = line[2:].split(": ", 1)
            sections.setdefault(current, {})[key] = value
        elif current == "Selection" and line.startswith("| ") and line[2:3].isdigit():
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return meta, sections, rows


def _compact(ids):
    """Independent range rendering: [0, 1, 2, 5] -> '0-2,5'."""
    out, run = [], [ids[0]]
    for e in ids[1:]:
        if e == run[-1] + 1:
            run.append(e)
        else:
            out.append(run)
            run = [e]
    out.append(run)
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in out)


def _profile(layer_ids, num_experts=16, top_k=2, seed=3):
    counts = np.random.default_rng(seed).integers(0, 400, (len(layer_ids), num_experts)).astype(np.int64)
    return Profile(
        counts,
        counts.astype(np.float32) / 5,
        counts[None].astype(np.int32),
        counts[None].astype(np.float32) / 5,
        np.array([1234]),
        list(layer_ids),
        num_experts,
        top_k,
        {"model": {"id": "moe-sieve-default"}, "data": {"data": "gsm8k:toy", "split": "train"}},
    )


@pytest.fixture
def peft_card(tmp_path):
    """A trained-for-one-step PEFT adapter made from a selection file plus its profile, saved with a card."""
    model = load_model(ModelSpec("moe-sieve-default", device="cpu"))
    layer_ids = [layer.layer_id for layer in find_moe_layers(model)]
    profile = _profile(layer_ids)
    profile.save(tmp_path / "profile")
    order = np.argsort(-profile.counts_LE, axis=1, kind="stable")[:, :3]
    sel = Selection(
        experts={layer: order[i].tolist() for i, layer in enumerate(layer_ids)},
        num_experts=16,
        strategy="topk",
        params={"k": 3, "k_resolved": 3},
    )
    sel.save(tmp_path / "hot.json")
    config = SieveConfig(
        selection=str(tmp_path / "hot.json"), profile=str(tmp_path / "profile"), r=4, lora_alpha=8, seed=7
    )
    fingerprint = config_fingerprint(model.config)
    peft_model = get_peft_model(model, config).train()
    ids = torch.randint(0, 2000, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    peft_model.record_card(training={"data": "gsm8k:toy"}, eval_result={"task": "gsm8k", "accuracy": 0.25, "n": 8})
    peft_model.save_pretrained(tmp_path / "adapter")
    return {
        "text": (tmp_path / "adapter" / "README.md").read_text(),
        "model": peft_model,
        "profile": profile,
        "selection": sel,
        "fingerprint": fingerprint,
        "tokens": int(mask.sum()),
        "dir": tmp_path / "adapter",
    }


def test_peft_card_fields(peft_card):
    import peft

    from moe_sieve.routing_stats import routing_stats

    meta, sections, rows = parse_card(peft_card["text"])
    model, profile, sel = peft_card["model"], peft_card["profile"], peft_card["selection"]
    base = model.get_base_model()
    assert meta["library_name"] == "peft" and meta["base_model"] == base.config._name_or_path
    assert {"moe-sieve", "peft", "mixture-of-experts"} <= set(meta["tags"]) and meta[
        "pipeline_tag"
    ] == "text-generation"

    b = sections["Base model"]
    assert (
        b["id"] == f"`{base.config._name_or_path}`" and b["class"] == "OlmoeForCausalLM" and b["model_type"] == "olmoe"
    )
    assert b["config fingerprint"] == peft_card["fingerprint"]
    assert b["MoE layers"] == "4 x 16 routed experts (top-2)"

    s = sections["Selection"]
    assert s["strategy"] == "topk" and s["k"] == "3" and s["adapted experts"] == "12 of 64 expert-layer slots"
    assert s["source"].endswith("hot.json")
    share = {
        layer: profile.counts_LE[i, sel.experts[layer]].sum() / profile.counts_LE[i].sum()
        for i, layer in enumerate(profile.layer_ids)
    }
    assert s["mean coverage of the profiled routing"] == f"{100 * np.mean(list(share.values())):.1f}%"
    assert rows == {
        str(layer): ["3", _compact(ids), f"{100 * share[layer]:.1f}%"] for layer, ids in sel.experts.items()
    }

    p = sections["Routing profile"]
    stats = routing_stats(profile.counts_LE, profile.mass_LE, profile.layer_ids, k=3).to_json()
    assert p["data"] == "data=gsm8k:toy, split=train" and p["examples"] == "1" and p["tokens"] == "1,234"
    assert p["fingerprint"] == profile.fingerprint
    assert p["global CV"] == f"{stats['global_cv']:.4g}" and p["mean layer CV"] == f"{stats['mean_layer_cv']:.4g}"
    assert p["mean top-3 coverage"] == f"{100 * stats['mean_coverage']:.1f}%"

    lo = sections["LoRA"]
    assert (lo["r"], lo["alpha"], lo["dropout"], lo["router"], lo["seed"]) == ("4", "8", "0.05", "lora", "7")
    assert lo["targets"] == "attention, router, shared, experts"

    t = sections["Trainable parameters"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    full = plan_adapters("moe-sieve-default", k=3, lora=SieveLoraConfig(r=4, alpha=8))["full_params"]
    assert t["this adapter"] == f"{trainable:,}" and t["full LoRA (every routed expert)"] == f"{full:,}"
    assert t["reduction vs full LoRA"] == f"{100 * (1 - trainable / full):.1f}%"

    tr = sections["Training"]
    assert tr == {
        "data": "gsm8k:toy",
        "optimizer steps": "1",
        "tokens": f"{peft_card['tokens']:,}",
        "router aux loss coef": "0",
    }
    assert "| gsm8k | accuracy | 0.25 | 8 |" in peft_card["text"]
    assert f"- PEFT {peft.__version__}" in peft_card["text"]


def test_run_card_fields(tiny_model_dir, copy_digits_jsonl, tmp_path):
    from moe_sieve.training import train

    run = tmp_path / "run"
    result = train(small_train_config(tiny_model_dir, copy_digits_jsonl, run, max_steps=2, k=3))
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    metrics = result.metrics
    sel = Selection.load(run / "selection.json")
    profile = Profile.load(run / "profile")
    (run / "eval.json").write_text(json.dumps({"task": "gsm8k", "n": 20, "accuracy": 0.35, "accuracy_norm": None}))
    write_run_card(run)  # after eval.json appears, as the docs say
    meta, sections, rows = parse_card((run / "adapter" / "README.md").read_text())
    assert meta["base_model"] == str(tiny_model_dir)
    assert sections["Base model"]["config fingerprint"] == adapter["base_model"]["config_fingerprint"]
    share = {
        layer: profile.counts_LE[i, sel.experts[layer]].sum() / profile.counts_LE[i].sum()
        for i, layer in enumerate(profile.layer_ids)
    }
    assert rows == {
        str(layer): ["3", _compact(ids), f"{100 * share[layer]:.1f}%"] for layer, ids in sel.experts.items()
    }
    assert sections["Selection"]["strategy"] == "topk" and sections["Selection"]["k"] == "3"
    assert sections["Routing profile"]["tokens"] == f"{profile.tokens:,}"
    assert sections["Routing profile"]["data"].startswith(f"data={copy_digits_jsonl}")
    t = sections["Trainable parameters"]
    full = plan_adapters(str(tiny_model_dir), k=3, lora=SieveLoraConfig(r=4, alpha=8))["full_params"]
    assert (
        t["this adapter"] == f"{metrics['trainable_params']:,}" and t["full LoRA (every routed expert)"] == f"{full:,}"
    )
    tr = sections["Training"]
    assert (
        tr["data"] == str(copy_digits_jsonl)
        and tr["optimizer steps"] == "2"
        and tr["tokens"] == f"{metrics['tokens_seen']:,}"
    )
    assert tr["examples"] == str(metrics["data"]["kept"]) and tr["batch size"] == "8"
    assert sections["LoRA"]["r"] == "4" and sections["LoRA"]["alpha"] == "8"
    assert "| gsm8k | accuracy | 0.35 | 20 |" in (run / "adapter" / "README.md").read_text()


class HubStub:
    """The Hub endpoints an upload touches, answered in memory; uploaded files are decoded from the commit."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.yaml_checked: list[dict] = []

    def __call__(self, request):
        import httpx2

        url = str(request.url)
        self.requests.append((request.method, url.split("huggingface.co", 1)[-1]))
        if url.endswith("/api/repos/create"):
            name = json.loads(request.content)["name"]
            return httpx2.Response(200, json={"url": f"https://huggingface.co/me/{name}", "name": f"me/{name}"})
        if url.endswith("/api/validate-yaml"):
            content = json.loads(request.content)["content"]
            self.yaml_checked.append(yaml.safe_load(content.split("---")[1]))  # must be valid YAML metadata
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in url:
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes})
        if "/commit/" in url:
            for line in request.content.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    self.files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
            return httpx2.Response(
                200, json={"commitUrl": "https://huggingface.co/me/sieve/commit/1", "commitOid": "1" * 40}
            )
        return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "not found"})


@pytest.fixture
def hub(monkeypatch):
    httpx2 = pytest.importorskip("httpx2")
    import huggingface_hub
    from huggingface_hub import constants

    stub = HubStub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(stub)))
    yield stub
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


def test_push_to_hub_through_peft_uploads_the_adapter_and_the_card(peft_card, hub):
    model = peft_card["model"]
    model.push_to_hub("sieve", token="hf_test")  # PEFT's own upload (transformers' PushToHubMixin)
    assert set(hub.files) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert json.loads(hub.files["adapter_config.json"])["peft_type"] == "MOE_SIEVE"
    assert hub.files["adapter_model.safetensors"] == (peft_card["dir"] / "adapter_model.safetensors").read_bytes()

    hub.files.clear()
    push_adapter_to_hub(model, "sieve", token="hf_test")  # the same files, with moe-sieve's card as README.md
    assert hub.files["README.md"].decode() == peft_card["text"]
    assert hub.yaml_checked[-1]["library_name"] == "peft" and "moe-sieve" in hub.yaml_checked[-1]["tags"]
    assert ("POST", "/api/repos/create") in hub.requests
