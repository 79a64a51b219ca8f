"""Budgets, serving split and the over-training scan."""

import json

import pytest

from spud.plan.allocate import overtrain_scan
from spud.plan.fit import CHINCHILLA
from spud.plan.planner import choose_config, compute_budget, plan, plan_cmd
from spud.plan.profiles import get_profile


def test_three_budget_routes_agree():
    h100 = get_profile("H100")
    rate = 989e12 * 0.4
    c = 8 * 10 * 86400 * rate  # 8 GPUs × 10 days
    by_gpus = plan(gpu="H100", gpus=8, days=10)
    by_budget = plan(budget=c, gpu="H100", gpus=8)
    by_dollars = plan(dollars=8 * 10 * 24 * h100.price_per_hour, gpu="H100", gpus=8)
    for r in (by_gpus, by_budget, by_dollars):
        assert r["budget"]["flops"] == pytest.approx(c, rel=1e-9)
        assert r["train"]["N_star"] == pytest.approx(by_gpus["train"]["N_star"], rel=1e-9)
    # the chosen model's exact FLOPs differ a little from 6ND, so wall-clock is near 10 days
    assert by_gpus["train"]["wall_clock_days"] == pytest.approx(10, rel=0.25)
    assert by_gpus["train"]["cost_usd"] == pytest.approx(by_budget["train"]["cost_usd"], rel=1e-9)


def test_user_hardware_yaml_overrides(tmp_path):
    f = tmp_path / "hw.yaml"
    f.write_text("H100: {price_per_hour: 1.0}\nMYCHIP: {peak_flops: {bf16: 1.0e15}, memory_gb: 96, bandwidth_gbs: 4000, price_per_hour: 2}\n")
    assert get_profile("h100", f).price_per_hour == 1.0 and get_profile("H100", f).peak("bf16") == 989e12
    b = compute_budget(hw=get_profile("MYCHIP", f), gpus=1, days=1, mfu=0.5)
    assert b.flops == pytest.approx(86400 * 0.5e15)


def test_config_close_to_target():
    _, cfg = choose_config(1e9, n_counts="total")
    from spud.model.flops import param_counts

    assert param_counts(cfg)["total"] == pytest.approx(1e9, rel=0.1)
    assert 64 <= cfg.d_model / cfg.n_layers <= 128 or cfg.preset


def test_less_serving_demand_leaves_more_training_compute():
    kw = {"gpu": "H100", "gpus": 64, "days": 30, "serve_prompt_tokens": 512,
          "serve_completion_tokens": 256, "serve_latency_ms": 50}
    low = plan(serve_requests_per_day=1e5, **kw)
    high = plan(serve_requests_per_day=2e7, **kw)
    assert low["split"]["serving_devices"] < high["split"]["serving_devices"]
    assert low["train"]["C"] > high["train"]["C"]
    assert high["serving"]["devices"] <= high["split"]["serving_devices"]


def test_overtrain_scan_prefers_smaller_model_for_heavy_inference():
    C = 1e22
    n_opt, _ = CHINCHILLA.optimal(C)
    light = overtrain_scan(CHINCHILLA, C, inference_tokens=1e6)
    heavy = overtrain_scan(CHINCHILLA, C, inference_tokens=1e14)
    assert light.best["N"] <= n_opt * (1 + 1e-9) and heavy.best["N"] < 0.9 * n_opt
    assert heavy.best["total_flops"] <= heavy.chinchilla["total_flops"]
    b = heavy.best
    assert CHINCHILLA.loss(b["N"], b["D"]) == pytest.approx(heavy.target_loss, rel=1e-9)


def test_plan_cmd_json_and_data_warning(tmp_path):
    out = tmp_path / "plan.json"
    res = plan_cmd(budget=1e21, gpus=8, unique_tokens=1e9, serve_requests_per_day=1e5,
                   horizon_days=365, json=str(out))
    data = json.loads(out.read_text())
    assert data["train"]["config"]["d_model"] == res["train"]["config"]["d_model"]
    assert any("Muennighoff" in w for w in res["warnings"])
    assert res["overtrain"]["best"]["N"] <= res["train"]["N_star"] * (1 + 1e-9)


def test_vision_stages_cost_counted_from_the_model(tmp_path, capsys):
    """--vision-images adds the tower's training FLOPs and the LM's FLOPs on each image's positions
    (both from spud.model.flops, the counts FlopCounterMode checks), and the tower's memory."""
    from spud.cli import main
    from spud.config import ModelConfig
    from spud.config_sections import VisionConfig
    from spud.model.flops import flops_per_token, image_flops
    from spud.model.memory import training_memory

    vision = tmp_path / "vision.yaml"
    vision.write_text("model:\n  vision:\n    image_size: 64\n    patch_size: 8\n    vit_dim: 96\n    vit_heads: 4\n")
    text = plan(budget=1e20, gpus=1)
    res = plan(budget=1e20, gpus=1, vision_images=2e6, vision_config=str(vision), vision_text_tokens=40)
    assert res["train"] == text["train"]  # the language model's plan is unchanged
    v = res["vision"]
    lm = choose_config(text["train"]["N_star"], 32768, 2048, CHINCHILLA.n_counts)[1]
    vlm = ModelConfig.model_validate({**lm.model_dump(), "vocab_size": 32769,
                                      "vision": VisionConfig(image_size=64, patch_size=8, vit_dim=96).model_dump()})
    assert v["tokens_per_image"] == 16  # (64 / 8 / 2)²
    per_image = image_flops(vlm)["training"] + (16 + 40) * flops_per_token(vlm, 56)["training"]
    # + the tower stage: spud vlm's 3,600 × 32 pictures through the tower and 475 read-out logits
    tower = 115200 * (image_flops(vlm)["training"] + 6 * 16 * vlm.d_model * 475)
    assert v["tower_stage_flops"] == pytest.approx(tower, rel=1e-12) and v["tower_images"] == 115200
    assert v["flops"] == pytest.approx(2e6 * per_image + tower, rel=1e-12)
    none = plan(budget=1e20, gpus=1, vision_images=2e6, vision_config=str(vision), vision_text_tokens=40,
                vision_tower_images=0)["vision"]
    assert none["flops"] == pytest.approx(2e6 * per_image, rel=1e-12) and none["tower_stage_flops"] == 0
    p = text["train"]["parallelism"]
    mem = training_memory(vlm, p["micro_batch"], 2048, "bf16", p["fsdp"], p["checkpointing"],
                          images=p["micro_batch"], optimizer="muon")
    assert v["memory"]["total"] == pytest.approx(mem.total) and mem.total > p["memory"]["total"]
    assert main(["plan", "--budget", "1e20", "--vision-images", "1e6"]) == 0
    assert "vision stages" in capsys.readouterr().out
    for argv, message in ((["--vision-images", "0"], "--vision-images must be > 0"),
                          (["--vision-images", "1e6", "--vision-tower-images", "-1"],
                           "--vision-tower-images must be >= 0"),
                          (["--vision-images", "1e6", "--vision-config", str(tmp_path / "none.yaml")],
                           "none.yaml: cannot read")):
        assert main(["plan", "--budget", "1e20", *argv]) == 2
        assert message in capsys.readouterr().err
