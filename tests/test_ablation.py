"""Tests of the ablation driver (stssa.ablation) on a tiny synthetic set: the whole protocol end to end in
CI time with the results.json format of the issue, the feature cache against the backbone, same seed ->
same numbers, and that `make demo` runs the same code."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from stssa import ablation
from stssa.ablation import PROTOCOLS, ROW_NAMES, FeatureCache, build_row_head, run_ablation, score_head, train_head

TINY = copy.deepcopy(PROTOCOLS["quick"])
TINY["data"] = {"videos": 4, "seconds": 3, "seed": 1, "height": 48, "width": 64, "val_fraction": 0.4}
TINY["head"]["epochs"] = 2
TINY["train_views"] = 2
TINY["backbone_overrides"] = ["train.epochs=1", "train.warmup_steps=1", "train.batch_size=2"]
TINY["chance_draws"] = 2
ROWS = ["baseline", "ssfa_tsfa_gap2048_2l_ln"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    doc = run_ablation(ROWS, 2, root / "out", root / "data", TINY, "tiny", quiet=True)
    return root, doc


def test_tiny_run_writes_the_results_format(tiny_run):
    root, doc = tiny_run
    out = root / "out"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    for key, typ in (("protocol", str), ("device", str), ("commit", str), ("chance", float), ("rows", list)):
        assert isinstance(on_disk[key], typ), key
    assert 0 < on_disk["chance"] < 1
    assert [r["name"] for r in on_disk["rows"]] == ROWS
    classes = set(on_disk["cues"])
    for r in on_disk["rows"]:
        assert isinstance(r["config"], str) and r["config"].startswith("synthetic_")
        assert len(r["mAP"]) == 2 and all(0 <= m <= 1 for m in r["mAP"])
        assert r["mean"] == pytest.approx(sum(r["mAP"]) / 2)
        assert r["std"] == pytest.approx(abs(r["mAP"][0] - r["mAP"][1]) / 2 ** 0.5)
        assert r["per_class"] and set(r["per_class"]) <= classes
        assert all(0 <= v <= 1 for v in r["per_class"].values())
    assert on_disk["rows"][0]["paper_mAP"] is None and on_disk["rows"][1]["paper_mAP"] == 23.0
    md = (out / "results.md").read_text()
    assert "| baseline |" in md and "| chance |" in md and "23.0" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The backbone's residual branches are measured, and are not dead (no zero-init of the last BN).
    ratios = on_disk["backbone"]["residual_over_shortcut"]
    assert len(ratios) == 4 and all(v > 0.05 for v in ratios.values())


def _cache_and_eval(root):
    from stssa.train import build_datasets
    from stssa.utils import load_config
    cfg = load_config(TINY["backbone_config"], [f"data.root={root / 'data'}"])
    model, _ = ablation.train_backbone(root / "data", root / "out", TINY["backbone_config"],
                                       TINY["backbone_overrides"], quiet=True)
    roi = ablation._roi_settings(cfg["model"]["head"])
    cache = ablation.build_cache(model.backbone.eval(), cfg["data"], roi, views=TINY["train_views"], quiet=True)
    return model, cfg, cache, build_datasets(cfg["data"])


def test_feature_cache_is_what_the_backbone_computes(tiny_run):
    from stssa.train import SeededItems
    root, _ = tiny_run
    model, cfg, cache, (train_set, val_set, _) = _cache_and_eval(root)
    backbone = model.backbone.eval()
    head = model.head  # the STSSA head's own RoIAlign, as the end-to-end model runs it
    items = SeededItems(train_set, 0)
    for view in (0, 1):
        items.epoch = 1000 + view
        for i in (0, len(train_set) - 1):
            it = items[i]
            rois = torch.cat([torch.zeros(len(it["boxes"]), 1), it["boxes"]], 1)
            with torch.no_grad():
                want = head.roi_features(backbone(it["clip"][None]), rois)
            got = cache.x[(cache.view == view) & (cache.item == i)]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(cache.y[(cache.view == view) & (cache.item == i)], it["labels"])
    # The two views differ (different augmentations), and the val features are those of the test view.
    assert not torch.equal(cache.x[cache.view == 0][:3], cache.x[cache.view == 1][:3])
    it = val_set[0]
    rois = torch.cat([torch.zeros(len(it["boxes"]), 1), it["boxes"]], 1)
    with torch.no_grad():
        want = head.roi_features(backbone(it["clip"][None]), rois)
    torch.testing.assert_close(cache.val_x[:len(want)], want, rtol=1e-5, atol=1e-5)
    assert [m[:2] for m in cache.val_meta[:len(want)]] == [(it["video_id"], it["timestamp"])] * len(want)


def test_same_seed_same_numbers(tiny_run):
    root, doc = tiny_run
    model, cfg, cache, (_, _, eval_info) = _cache_and_eval(root)
    hcfg = TINY["head"]
    results = []
    for seed in (0, 0, 1):
        head = build_row_head("synthetic_ssfa_tsfa_gap2048_2l_ln", 64, 16, seed)
        tr = train_head(head, cache, hcfg, seed, quiet=True)
        results.append((tr["final_loss"], tr["diagnostics"], score_head(head, cache, eval_info)["mAP"]))
    assert results[0] == results[1]
    assert results[0] != results[2]
    # ... and the same as in the full run (same backbone, same cache, same seed).
    row = next(r for r in doc["rows"] if r["name"] == "ssfa_tsfa_gap2048_2l_ln")
    assert row["mAP"][0] == results[0][2]


def test_rows_must_share_the_cache_roi_settings_and_names_are_checked(tiny_run, tmp_path):
    root, _ = tiny_run
    x = torch.zeros(2, 64, 8, 3, 3)
    cache = FeatureCache(x, torch.zeros(2, 80), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                         x, [], {"roi_size": 7, "sampling_ratio": 0, "aligned": True})
    with pytest.raises(ValueError, match="RoI settings"):
        ablation.run_row("baseline", "synthetic_baseline", cache, {}, TINY["head"], [0], 64, 16, quiet=True)
    with pytest.raises(ValueError, match="unknown rows"):
        run_ablation(["nope"], 1, tmp_path, tmp_path, TINY, "tiny", quiet=True)


def test_every_row_config_builds_and_keeps_the_paper_structure():
    from stssa.models.heads import STSSAHead
    paper = {r[0]: r[2] for r in ablation.ROWS}
    assert [n for n in ROW_NAMES if paper[n] is not None] == [
        "tsfa_gap512", "tsfa_gmp512", "ssfa_gmp512", "ssfa_tsfa_gap2048", "ssfa_tsfa_gap2048_2l",
        "ssfa_tsfa_gap2048_2l_ln"]
    heads = {name: build_row_head(cfg, 64, 16, 0) for name, cfg, *_ in ablation.ROWS}
    e = {n: h.blocks[0].proj["fast"]["q"].out_channels for n, h in heads.items()
         if isinstance(h, STSSAHead) and len(h.blocks)}
    assert e["tsfa_gap512"] * 4 == e["ssfa_tsfa_gap2048"]  # the paper's 512 : 2048
    assert [b.axis for b in heads["ssfa_tsfa_gap2048_2l_ln"].blocks] == ["spatial", "temporal"] * 2
    assert heads["ssfa_tsfa_gap2048_2l_ln"].blocks[0].norm is not None
    assert heads["ssfa_tsfa_gap2048_2l"].blocks[0].norm is None
    assert heads["tsfa_gmp512"].pool == "max" and heads["tsfa_gap512"].pool == "avg"
    assert len(heads["stssa_0l"].blocks) == 0 and heads["baseline"].pool == "max"
    assert heads["stssa_scale1"].blocks[0].scale == 1.0 and heads["ssfa_tsfa_gap2048_2l_ln"].blocks[0].scale is None


def test_demo_runs_the_ablation_code(monkeypatch, tmp_path):
    from stssa import demo
    seen = {}

    def fake(rows, seeds, out, data, protocol, name, quiet=False):
        seen.update(rows=rows, seeds=seeds, protocol=protocol, name=name)
        return {"rows": [], "chance": 0.1}
    monkeypatch.setattr(demo, "run_ablation", fake)
    assert demo.main(["--out", str(tmp_path), "--data", str(tmp_path / "d"), "--quiet"]) == 0
    assert seen["rows"] == ablation.DEMO_ROWS and seen["seeds"] == 1
    assert seen["protocol"] == PROTOCOLS["demo"] and seen["name"] == "demo"
    assert demo.run_ablation is fake and ablation.run_ablation is not fake


@pytest.mark.parametrize("axis", ["spatial", "temporal"])
@pytest.mark.parametrize("kw", [{}, {"layernorm": True, "scale": 1.0}, {"layernorm": True, "norm_position": "pre"}])
def test_block_reference_is_the_block(axis, kw):
    """The diagnostics recompute each block with its attention kept: the same output as the block."""
    from stssa.models.heads import SlowFastAttention
    torch.manual_seed(0)
    blk = SlowFastAttention(16, 8, axis, slow_kernel=3, gamma_init=0.8, **kw).double().eval()
    x = torch.randn(3, 16, 5, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        want = blk(x)
    got, stats = ablation.block_reference(blk, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert set(stats) == {"slow", "fast"}
    for st in stats.values():
        assert 0 < st["entropy_over_max"] <= 1 and st["update_over_input"] > 0 and st["gamma"] == 0.8


def test_flat_probe_diagnostic_row(tiny_run):
    root, _ = tiny_run
    model, cfg, cache, (_, _, eval_info) = _cache_and_eval(root)
    r = ablation.run_row("probe_flat", "probe_flat", cache, eval_info, TINY["head"], [0], 64, 16, quiet=True)
    assert r["head_params"] == cache.x[0].numel() * 80 + 80 and 0 <= r["mean"] <= 1
    assert "probe_flat" in ROW_NAMES and "probe_flat" not in ablation.DEFAULT_ROWS


def test_demo_pictures_from_an_ablation_run(tiny_run):
    """The demo's last step (stssa.visualize.demo_pictures) reads the per-head detections the demo writes."""
    from stssa.demo import head_results
    from stssa.visualize import demo_pictures
    root, doc = tiny_run
    out = root / "out"
    results = head_results(doc, out)
    assert set(results) == {"baseline", "stssa", "chance"}
    for key in ("baseline", "stssa"):
        assert results[key]["frame_mAP"] == next(r for r in doc["rows"] if r["config"].endswith(
            "baseline" if key == "baseline" else "2l_ln"))["mAP"][0]
        assert (out / key / f"detections_epoch{TINY['head']['epochs']}.csv").read_text()
    pics = demo_pictures(root / "data", out, results)
    for p in pics.values():
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_folder_that_is_not_a_synthetic_set_is_never_replaced(tmp_path, capsys):
    """--data pointing at a user's dataset: an error, nothing deleted (it was rmtree'd and regenerated)."""
    data = tmp_path / "mine"
    (data / "frames" / "movie1").mkdir(parents=True)
    (data / "frames" / "movie1" / "movie1_000001.jpg").write_bytes(b"x")
    assert ablation.main(["--quick", "--out", str(tmp_path / "o"), "--data", str(data)]) == 2
    assert "not a synthetic set" in capsys.readouterr().err
    assert (data / "frames" / "movie1" / "movie1_000001.jpg").read_bytes() == b"x"


@pytest.mark.parametrize("args, match", [(["--rows", "bogus"], "invalid choice: 'bogus'"),
                                         (["--seeds", "0"], "--seeds must be >= 1"),
                                         (["--head-set", "scale"], "expected KEY=VALUE")])
def test_cli_argument_errors(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        ablation.main(["--quick", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"), *args])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_bad_head_override_fails_before_any_work(tmp_path, capsys):
    """A misspelt --head-set key is an error before the dataset, the backbone and the feature cache."""
    assert ablation.main(["--quick", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"),
                          "--head-set", "bogus=1"]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
