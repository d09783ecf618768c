"""A protocol run end to end on a small manifest with the tiny trained expert bank: scoring once per
variant, thresholds from the source, the analyses, and ``tarfas eval ... --report DIR``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_manifest
from PIL import Image

from app.cli import main
from core.evaluation.analyses import ABLATION, run_evaluation, tool_use_by_attack_type
from core.evaluation.manifest import read_manifest
from core.evaluation.metrics import eer_threshold, fas_metrics
from core.evaluation.scoring import FaceCache, Variant, score_variant
from core.policies.expert import ExpertPolicy
from core.registry import ToolRegistry


@pytest.fixture(scope="module")
def small(tiny_manifest, tmp_path_factory) -> dict:
    """The 24 tiny images in two domains: alpha (groups s00, s01; s00 = train) and beta (s02, s03);
    one beta spoof has no attack type, one is 'unknown'."""
    d = tmp_path_factory.mktemp("eval_small")
    rows = []
    with open(tiny_manifest) as f:
        for r in csv.DictReader(f):
            g = r["path"].split("_")[0]
            r = dict(r, path=str(Path(tiny_manifest).parent / r["path"]))
            r["domain"] = "alpha" if g in ("s00", "s01") else "beta"
            r["split"] = "train" if g in ("s00", "s02") else "test"
            rows.append(r)
    beta_spoofs = [r for r in rows if r["domain"] == "beta" and r["label"] == "spoof"]
    beta_spoofs[0]["attack_type"] = ""
    beta_spoofs[1]["attack_type"] = "unknown"
    manifest = write_manifest(d / "manifest.csv", rows)
    proto = d / "one_to_n.yaml"
    proto.write_text(
        yaml.safe_dump(
            {
                "name": "small",
                "kind": "one_to_n",
                "description": "tiny",
                "manifests": ["manifest.csv"],
                "source": {"domain": "alpha", "split": "train"},
                "targets": [{"domain": "alpha", "split": "test"}, "beta"],
            }
        )
    )
    loo = d / "loo.yaml"
    loo.write_text(
        yaml.safe_dump(
            {
                "kind": "leave_one_out",
                "description": "tiny loo",
                "manifests": ["manifest.csv"],
                "domains": ["alpha", "beta"],
            }
        )
    )
    return {"dir": d, "manifest": manifest, "protocol": proto, "loo": loo}


@pytest.fixture(scope="module")
def policy(tiny_weights):
    return ExpertPolicy.load(tiny_weights)


@pytest.fixture(scope="module")
def full(small, policy):
    from core.evaluation.protocols import load_protocol

    return run_evaluation(
        load_protocol(small["protocol"]),
        policy,
        registry=ToolRegistry(readers=policy.bank),
        analyses=("fast", "tools", "tool-use", "max-calls"),
        max_calls_grid=(1, 3),
        n_boot=50,
        progress=False,
    )


def test_main_folds_use_the_source_eer_threshold(full):
    (fold,) = full.folds
    src = [full.scores[r.path] for r in full.picked[full.protocol.folds[0].source]]
    assert len(src) == 6
    assert fold.threshold == pytest.approx(eer_threshold([s.row.y for s in src], [s.score_spoof for s in src]))
    assert "EER of the reasoning scores on the source" in fold.threshold_source
    assert list(fold.targets) == ["alpha-test", "beta"] and fold.pooled is not None
    # Recompute a target's metrics by hand from the per-image scores.
    beta = [full.scores[r.path] for r in full.picked[full.protocol.folds[0].targets[1]]]
    m = fas_metrics(
        [s.row.y for s in beta], [s.score_spoof for s in beta], fold.threshold, [s.row.attack_type for s in beta]
    )
    got = fold.targets["beta"]
    assert (got.auc, got.hter, got.acer, got.apcer_by_type) == (m.auc, m.hter, m.acer, m.apcer_by_type)
    assert set(got.apcer_by_type) == {"print", "replay", "unknown", "unspecified"}
    assert sum(got.n_by_type.values()) == got.n_spoof == 6
    assert got.n == 12 and fold.pooled.n == 18
    assert got.ci and got.n_boot == 50  # the main table has bootstrap intervals
    assert full.images == 24  # alpha-train (6, source) + alpha-test (6) + beta (12), each scored once


def test_fast_vs_reasoning_from_the_same_trajectories(full):
    (fast,) = full.fast
    src = [full.scores[r.path] for r in full.picked[full.protocol.folds[0].source]]
    assert fast.threshold == pytest.approx(eer_threshold([s.row.y for s in src], [s.fast_score for s in src]))
    targets = [full.scores[r.path] for t in full.protocol.folds[0].targets for r in full.picked[t]]
    m = fas_metrics([s.row.y for s in targets], [s.fast_score for s in targets], fast.threshold)
    assert fast.pooled.auc == m.auc and fast.pooled.hter == m.hter
    c = full.answer_changes[full.protocol.folds[0].name]
    assert c["n"] == 18 and c["changed"] == c["corrected"] + c["broken"]


def test_ablation_and_max_calls(full):
    assert [v.variant.name for v in full.ablation] == [name for name, _ in ABLATION]
    zoom = full.ablation[0]
    assert zoom.variant.tools == ("ZoomInTool",) and zoom.mean_calls <= 1.0
    # "All tools" and "max 3" are the main configuration: scored once, identical numbers.
    assert full.ablation[-1].folds[0].pooled.to_dict() == {
        **full.folds[0].pooled.to_dict(),
        "ci": {},
        "ci_level": None,
        "n_boot": 0,
    }
    assert [v.variant.max_tool_calls for v in full.max_calls] == [1, 3]
    assert full.max_calls[0].mean_calls <= 1.0
    assert full.max_calls[1].folds[0].threshold == full.folds[0].threshold
    assert len(full.variant_seconds) == 5 + 1  # five tool sets + max 1 call; the rest reused


def test_tool_use_by_attack_type(full):
    tu = full.tool_use
    assert list(tu)[0] == "real" and {"print", "replay", "unknown", "unspecified"} <= set(tu)
    assert sum(u["n"] for u in tu.values()) == full.images
    for u in tu.values():
        assert 1 <= u["mean_calls"] <= 3
        assert sum(u["family_share"].values()) == pytest.approx(1.0)
        assert sum(u["first_tool"].values()) == pytest.approx(1.0)


def test_tool_use_counts_by_hand():
    from core.evaluation.manifest import ManifestRow
    from core.evaluation.scoring import ScoredImage

    def img(label, at, calls):
        return ScoredImage(ManifestRow(Path(f"/{len(calls)}{at}{label}"), "x", label, at, "d", ""), 0.5, True, calls)

    tu = tool_use_by_attack_type(
        [
            img("real", "", ["ZoomInTool", "FFTTool"]),
            img("real", "", ["ZoomInTool"]),
            img("spoof", "print", ["LBPTool"]),
            ScoredImage(ManifestRow(Path("/u"), "u", "spoof", "print", "d", ""), None),
        ]
    )
    assert tu["real"]["n"] == 2 and tu["real"]["mean_calls"] == 1.5
    assert tu["real"]["tool_rate"]["ZoomInTool"] == 1.0 and tu["real"]["tool_rate"]["FFTTool"] == 0.5
    assert tu["real"]["family_share"] == {"zoom": 2 / 3, "frequency": 1 / 3, "texture": 0.0, "structure": 0.0}
    assert tu["print"]["n"] == 1 and tu["print"]["first_tool"]["LBPTool"] == 1.0  # the unreadable one is not counted


def test_variant_restricts_the_tools(small, policy):
    rows = read_manifest(small["manifest"])[:4]
    cache = FaceCache()
    scored = score_variant(
        rows, cache, policy, Variant("tex", ("LBPTool",), 3), registry=ToolRegistry(readers=policy.bank), progress=False
    )
    assert all(set(s.tool_calls) <= {"LBPTool"} for s in scored.values())
    none = score_variant(
        rows, cache, policy, Variant("none", None, 0), registry=ToolRegistry(readers=policy.bank), progress=False
    )
    assert all(s.tool_calls == [] and s.score_spoof is not None for s in none.values())


def test_unreadable_image_is_recorded_not_fatal(small, policy, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    rows = read_manifest(write_manifest(tmp_path / "m.csv", [{"path": str(bad), "label": "real", "domain": "x"}]))
    scored = score_variant(
        rows, FaceCache(), policy, Variant("main", None, 3), registry=ToolRegistry(readers=policy.bank), progress=False
    )
    (s,) = scored.values()
    assert s.score_spoof is None and s.error


def test_cli_protocol_report_end_to_end(small, tiny_weights, tmp_path, capsys):
    out = tmp_path / "report"
    argv = [
        "eval",
        str(small["loo"]),
        "--weights",
        str(tiny_weights),
        "--report",
        str(out),
        "--analyses",
        "all",
        "--max-calls-grid",
        "1,2",
        "--bootstrap",
        "30",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "-> alpha" in text and "-> beta" in text and "report:" in text
    files = {p.name for p in out.iterdir()}
    assert {"report.md", "report.json", "roc.png", "det.png", "max_tool_calls.png", "scores.csv"} <= files
    for png in ("roc.png", "det.png", "max_tool_calls.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    rep = json.loads((out / "report.json").read_text())
    run = rep["run"]
    assert run["seed"] == 0 and run["command"][:3] == ["tarfas", "eval", str(small["loo"])]
    assert {"tarfas", "torch", "scikit-learn"} <= set(run["versions"])
    assert "experts.json" in run["weights_sha256"] and len(run["weights_sha256"]["experts.json"]) == 64
    assert run["protocol_sha256"] and rep["policy"]["name"] == "expert" and rep["policy"]["version"]
    assert [f["fold"] for f in rep["results"]] == ["-> alpha", "-> beta"]
    assert rep["mean_over_folds"]["hter"] is not None
    assert {"fast_vs_reasoning", "tool_ablation", "max_tool_calls", "tool_use_by_attack_type"} <= set(rep)
    assert all("EER of the reasoning scores on the source" in f["threshold_source"] for f in rep["results"])
    md = (out / "report.md").read_text()
    assert "HTER@test-EER % (optimistic)" in md and "optimistic, paper-style" in md
    assert "Table S6" in md and "Table 2" in md and "Fig. S11" in md and "Tool use per attack type" in md
    assert "![roc.png](roc.png)" in md and run["command_line"] in md
    with open(out / "scores.csv") as f:
        assert len(list(csv.DictReader(f))) == 24
    # Reproducible: the same command gives the same numbers.
    out2 = tmp_path / "again"
    assert main(argv[:5] + [str(out2)] + argv[6:]) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["results"] == rep["results"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert (
        strip(rep2["tool_ablation"]) == strip(rep["tool_ablation"])
        and rep2["fast_vs_reasoning"] == rep["fast_vs_reasoning"]
    )


def test_cli_manifest_report_with_fixed_threshold(small, tiny_weights, tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        main(
            [
                "eval",
                str(small["manifest"]),
                "--weights",
                str(tiny_weights),
                "--threshold",
                "0.5",
                "--report",
                str(out),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    (fold,) = rep["results"]
    assert fold["threshold"] == 0.5 and "a priori" in fold["threshold_source"]
    assert list(fold["targets"]) == ["alpha", "beta"] and fold["pooled"]["n"] == 24
    assert fold["pooled"]["ci"] == {}
    assert "fast_vs_reasoning" not in rep


def test_cli_protocol_errors(small, tiny_weights, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.yaml"), "--weights", str(tiny_weights)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", str(small["protocol"]), "--weights", str(tiny_weights), "--limit", "3"]) == 2
    assert "--limit-per-domain" in capsys.readouterr().err
    assert main(["eval", str(small["protocol"]), "--weights", str(tiny_weights), "--analyses", "bogus"]) == 2
    assert "unknown analyses" in capsys.readouterr().err
    assert main(["eval", str(small["protocol"]), "--weights", str(tiny_weights), "--domains", "alpha"]) == 2


def test_policy_threshold_mode(small, policy, tmp_path):
    from core.evaluation.protocols import load_protocol

    p = load_protocol(small["protocol"])
    p.threshold = "policy"
    res = run_evaluation(
        p, policy, registry=ToolRegistry(readers=policy.bank), n_boot=0, progress=False, limit_per_domain=2
    )
    assert res.folds[0].threshold == policy.threshold and "shipped threshold" in res.folds[0].threshold_source
    assert all(len(rows) <= 2 for rows in res.picked.values())
    assert np.isfinite([s.score_spoof for s in res.scores.values()]).all()


def test_cli_manifest_report_with_dev_manifest(small, tiny_weights, tmp_path, capsys):
    """--dev-manifest: the threshold is the EER of the dev manifest's scores (here: the alpha rows)."""
    dev_rows = [r for r in read_manifest(small["manifest"]) if r.domain == "alpha"]
    dev = write_manifest(
        tmp_path / "dev.csv",
        [
            {"path": str(r.path), "label": r.label, "attack_type": r.attack_type, "domain": r.domain, "split": r.split}
            for r in dev_rows
        ],
    )
    out = tmp_path / "r"
    assert (
        main(
            [
                "eval",
                str(small["manifest"]),
                "--weights",
                str(tiny_weights),
                "--domains",
                "beta",
                "--dev-manifest",
                str(dev),
                "--report",
                str(out),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    (fold,) = rep["results"]
    assert list(fold["targets"]) == ["beta"] and fold["source_n"] == 12
    scores = {row["path"]: float(row["score_spoof"]) for row in csv.DictReader(open(out / "scores.csv"))}
    y = [r.y for r in dev_rows]
    s = [scores[str(r.path)] for r in dev_rows]
    assert fold["threshold"] == pytest.approx(eer_threshold(y, s))


def test_an_investigation_without_a_verdict_is_counted_apart_from_unreadable_images(tmp_path):
    """A readable face whose policy never answers (an MLLM that breaks the protocol) is 'no verdict', not 'unreadable'."""
    from core.evaluation import report, scoring
    from core.policies import ScriptedPolicy

    good = tmp_path / "face.png"
    Image.fromarray(
        np.asarray(Image.open(Path(__file__).resolve().parents[1] / "assets" / "samples" / "astronaut_live.png"))
    ).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    rows = read_manifest(
        write_manifest(
            tmp_path / "m.csv",
            [{"path": str(good), "label": "real", "domain": "x"}, {"path": str(bad), "label": "real", "domain": "x"}],
        )
    )
    scored = list(
        scoring.score_variant(
            rows, FaceCache(), ScriptedPolicy(["garbage"] * 10), Variant("main", None, 3), progress=False
        ).values()
    )
    m = scoring.metrics_by_domain(scored, 0.5)["pooled"]
    assert (m["n"], m["unreadable"], m["no_verdict"]) == (0, 1, 1)
    assert [s.no_verdict for s in scored] == [True, False] and [s.unreadable for s in scored] == [False, True]
    assert "no scored images" in report.domain_table({"pooled": m})
