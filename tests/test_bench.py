"""bench/full_size.py runs end to end at tiny size on CPU (the full size needs a GPU)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

from tests.conftest import REPO


def _bench_module():
    spec = importlib.util.spec_from_file_location("full_size", REPO / "bench" / "full_size.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_size_bench_runs_at_tiny_size(tmp_path, capsys):
    bench = _bench_module()
    out = tmp_path / "bench.json"
    bench.main(["--size", "tiny", "--device", "cpu", "--iters", "1", "--warmup", "0",
                "--json", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    for key in ("device_name", "dtype", "batch", "image_tokens", "text_tokens", "params",
                "lora_params", "flops", "time_s", "images_per_s", "tflops", "peak_tflops",
                "mfu", "peak_memory_bytes", "memory_kind", "predicted"):  # fmt: skip
        assert key in r, key
    assert r["flops"]["forward_per_row"] > 0 and r["flops"]["train_step"] > 0
    # 10 steps x 2 CFG rows per image
    assert r["flops"]["sample"] == 10 * 2 * r["batch"] * r["flops"]["forward_per_row"]
    assert r["time_s"]["sample"] > 0 and r["images_per_s"] > 0
    assert r["peak_tflops"] is None and r["mfu"]["train_step"] is None  # CPU: MFU n/a
    assert r["memory_kind"] == "cpu_max_rss" and r["peak_memory_bytes"]["train_step"] > 0
    assert r["ratio_mean_abs_err"] < 1e-6  # collection and re-scoring agree before the update
    assert r["predicted"]["sample_s"] > 0
    assert "MFU n/a" in capsys.readouterr().out


def test_full_size_bench_split_cfg_forward(tmp_path):
    bench = _bench_module()
    out = tmp_path / "bench.json"
    args = ["--size", "tiny", "--device", "cpu", "--iters", "1", "--warmup", "0"]
    bench.main([*args, "--cfg-forward", "split", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["cfg_forward"] == "split" and r["ratio_mean_abs_err"] < 1e-6
    bench.main([*args, "--json", str(out)])
    batched = json.loads(out.read_text())
    # the negative rows' forward + backward became a forward without autograd
    b, f_row = r["batch"], r["flops"]["forward_per_row"]
    per_row = batched["flops"]["train_step"] // (2 * b)  # forward + backward of one row
    assert r["flops"]["train_step"] == b * per_row + b * f_row
    assert r["predicted"]["train_step_s"] < batched["predicted"]["train_step_s"]


def test_score_overlap_bench_gives_the_same_scores(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "score_overlap", REPO / "bench" / "score_overlap.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.main(["--reward", "toy_ocr", "--prompts", "2", "--group", "2", "--batch", "2",
                    "--repeats", "1", "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert r["images"] == 4 and r["same_scores"] is True
    assert r["machine"]["cpu_count"] >= 1 and "torch_threads" in r["machine"]
    assert r["seconds"]["sequential"] > 0 and r["seconds"]["overlapped"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["speedup"] == r["speedup"]


def test_grpo_vs_crd_images_to_reach_uses_the_trailing_mean():
    spec = importlib.util.spec_from_file_location("grpo_vs_crd", REPO / "bench" / "grpo_vs_crd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    curve = {"images": [64, 128, 192, 256, 320], "reward_mean": [0.9, 0.1, 0.5, 0.5, 0.7]}
    # trailing means over k=2: (0.9), 0.5, 0.3, 0.5, 0.6 -> the first full window >= 0.5 is
    # at epoch 2 (128 images); a lone first epoch of 0.9 does not count
    assert mod.images_to_reach(curve, 0.5, k=2) == 128
    assert mod.images_to_reach(curve, 0.55, k=2) == 320
    assert mod.images_to_reach(curve, 0.8, k=2) is None
    assert set(mod.machine()) >= {"platform", "cpu_count", "torch_threads"}


def test_opd_vs_grpo_bench_runs_on_the_tiny_model(tmp_path):
    spec = importlib.util.spec_from_file_location("opd_vs_grpo", REPO / "bench" / "opd_vs_grpo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--epochs", "2", "--repeats", "1", "--steps", "4", "--prompts", "2",
                       "--group", "2", "--batch", "4", "--window", "2",
                       "--out", str(tmp_path)]) == 0  # fmt: skip
    r = json.loads((tmp_path / "opd_vs_grpo.json").read_text())
    assert r["settings"]["window"] == 2 and r["machine"]["cpu_count"] >= 1
    assert set(r["ratio_vs_grpo"]) == {"opd", "opd_unfused", "opd_no_mar"}
    for v, ratio in r["ratio_vs_grpo"].items():
        m = r["median_epoch_seconds"][v]
        assert ratio == m["total"] / r["median_epoch_seconds"]["grpo"]["total"] > 0


def test_cfg_train_time_bench_runs_and_split_keeps_the_gradient(capsys):
    spec = importlib.util.spec_from_file_location("cfg_tt", REPO / "bench" / "cfg_train_time.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(["--model", "tiny", "--repeats", "1", "--prompts", "2"])
    assert set(r["cpu_median_s"]) == {"both", "cond", "split"}
    assert all(t > 0 for t in r["cpu_median_s"].values())
    assert r["split_vs_cond_grad_rel_diff"] < 1e-5  # float round-off, not another gradient
    assert "split vs cond gradient" in capsys.readouterr().out


def test_full_size_bench_takes_the_config_resolution(tmp_path):
    bench = _bench_module()
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  resolution: 32\n")
    out = tmp_path / "bench.json"
    bench.main(["--size", "tiny", "--device", "cpu", "--iters", "1", "--warmup", "0",
                "--config", str(cfg), "--json", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    # 32 px / VAE 8 = 4 latents per side / patch 2 = 2 -> 4 image tokens (64 px: 16)
    assert r["resolution"] == 32 and r["image_tokens"] == 4
    args = bench.parse_args(["--size", "full", "--config", str(cfg), "--resolution", "512"])
    assert bench.resolution_of(args, 1024) == 512  # --resolution wins over the config


def test_efficiency_curves_means_and_table(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("efficiency", REPO / "bench" / "efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "efficiency", mod)  # its dataclass looks itself up
    spec.loader.exec_module(mod)

    def log(run, scores):  # epochs of 64 images, 10 s each, an evaluation every 2 epochs
        run.mkdir(parents=True)
        rows = []
        for e in range(len(scores) * 2):
            r = {"epoch": e, "images": 64 * (e + 1), "time/sample": 6.0, "time/train": 4.0}
            if e % 2 == 1:
                r.update({"eval/toy-geneval": scores[e // 2], "eval/toy-geneval/overall_se": 0.02,
                          "eval/toy-geneval/counting": 1.0})  # fmt: skip
            rows.append(json.dumps(r))
        rows.insert(1, rows[0])  # an epoch logged twice (a resumed run): counted once
        (run / "log.jsonl").write_text("\n".join(rows) + "\n")

    log(tmp_path / "g0", [0.5, 0.6, 0.7])
    log(tmp_path / "g1", [0.5, 0.6, 0.8])
    log(tmp_path / "n0", [0.7, 0.76, 0.8])
    c = mod.read_curve(tmp_path / "g0", "geneval")
    assert c == {"epoch": [1, 3, 5], "images": [128, 256, 384], "seconds": [20.0, 40.0, 60.0],
                 "score": [0.5, 0.6, 0.7], "se": [0.02, 0.02, 0.02]}  # fmt: skip
    g = mod.mean_curve([c, mod.read_curve(tmp_path / "g1", "geneval")])
    assert g["score"][-1] == 0.75 and g["n"] == [2, 2, 2]
    assert abs(g["se"][-1] - 0.05) < 1e-12  # std (ddof 1) 0.0707 / sqrt(2)
    n = mod.mean_curve([mod.read_curve(tmp_path / "n0", "geneval")])
    assert n["se"] == [0.02, 0.02, 0.02]  # one seed: the evaluation's own se
    rows = mod.table({"geneval": {"grpo": g, "nft": n}},
                     {("geneval", "grpo"): 3.0, ("geneval", "nft"): 1.0})  # fmt: skip
    nft = next(r for r in rows if r["method"] == "nft")
    # GRPO's final mean 0.75 is first reached at NFT's second evaluation (0.76, 256 images)
    assert (nft["target"], nft["images_to_target"], nft["seconds_to_target"]) == (0.75, 256, 40.0)
    assert nft["fraction_of_reference"] == 256 / 384
    assert "| geneval | nft | 1 | 1 | 0.800 ± 0.020 | 384 | 256 | 0.67 | 40 |" in mod.markdown(
        rows, {"platform": "x", "cpu_count": 2}
    )
    # --add: an earlier result file's runs (their recorded curves) join a later run's table
    job = mod.Job("geneval", "grpo", 0, "c.yaml", 6, 64, 2, 3.0, ("train.seed=0",), "g0")
    other = mod.Job("ocr", "grpo", 0, "c.yaml", 6, 64, 2, 3.0, (), "o0")
    runs = [{**dataclasses.asdict(j), "curve": c} for j in (job, other)]
    saved = tmp_path / "earlier.json"
    saved.write_text(json.dumps({"runs": runs}))
    assert mod.added_runs([str(saved)], ["geneval"]) == [(job, c)]  # the other task left out
