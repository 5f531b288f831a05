"""The bench scripts run and write their JSON (figures are not asserted: benchmarks, not tests)."""

import json

from bench import params, step


def test_params_bench_writes_table1_figures(tmp_path, capsys):
    out = tmp_path / "params.json"
    fig = params.main(["--out", str(out)])
    assert json.loads(out.read_text()) == fig
    assert abs(fig["ec_xl_8e_total_vs_paper_ratio"] - 1) < 0.005  # XL matches Table 1
    assert fig["ec_m_64e_total_params"] > 97e9
    assert "ec-m-64e" in capsys.readouterr().out


def test_step_bench_compares_four_models(tmp_path):
    out = tmp_path / "step.json"
    fig = step.main(["--preset", "tiny-ec", "--batch", "4", "--iters", "1", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    for key in ("dense_step_ms", "dense_eq_step_ms", "ec_step_ms", "tc_step_ms", "ec_vs_dense_eq_ratio"):
        assert saved[key] > 0
    assert abs(fig["ec_vs_dense_eq_ratio"] - fig["ec_step_ms"] / fig["dense_eq_step_ms"]) < 1e-2
    assert saved["torch_version"].startswith("2.13.0")


def test_data_scale_bench_reports_jpeg_rates_and_resume_costs(tmp_path):
    from bench import data_scale

    out = tmp_path / "data_scale.json"
    fig = data_scale.main(["--jpeg-samples", "32", "--workers", "1", "--resume-shards", "20", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == fig
    assert fig["jpeg_w1_samples_per_s"] > 0 and fig["jpeg_bytes_per_sample"] > 5000
    for mode in ("exact", "elastic"):
        assert all(fig[f"resume_{mode}_{p}pct_bytes_read"] > 0 for p in (10, 50, 90))
    assert fig["workers_per_gpu"] == -(-fig["xl8e_images_per_s_per_gpu"] // fig["jpeg_w1_per_worker_samples_per_s"])
