"""Training, checkpoints and safe loading of the correlation-driven network (train.py)."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from CorrRegLib.geometry import Camera
from CorrRegLib.model import CorrelationNet, NetConfig
from CorrRegLib.phantom import small_phantom
from CorrRegLib.train import (
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    PoseRanges,
    load_model,
    sample_cases,
    train,
)

CAMERA = Camera(1011.7, (0.798, 0.798), (256, 256))  # downsampled by train() to input_size
TINY = dict(input_size=32, stem_channels=4, stage_channels=(8, 8), head_hidden=(16,), head_pool=2)
FAST = dict(batch_size=4, xray_pool=16, progress=False, checkpoint_every=0, **TINY)

#: The short run used to check that training helps: steps and learning rate.
SHORT_STEPS, SHORT_LR = 60, 3e-3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom():
    return small_phantom(0, spacing_mm=5.0)


@pytest.fixture(scope="module")
def short_run(phantom, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("short")
    return train([phantom.volume], CAMERA, out, steps=SHORT_STEPS, lr=SHORT_LR, seed=0, n_validation=48, **FAST)


def _weights(path):
    return load_file(str(path / MODEL_FILE))


def test_pose_sampling_matches_the_protocol_ranges(phantom):
    iso = phantom.volume.bone_center_lps()
    gen = torch.Generator().manual_seed(0)
    truth, pose = sample_cases(gen, 400, iso, PoseRanges(), full_range=True)
    rel = pose @ torch.linalg.inv(truth)
    angle = torch.rad2deg(torch.arccos(((rel[:, 0, 0] + rel[:, 1, 1] + rel[:, 2, 2] - 1) / 2).clamp(-1, 1)))
    # three N(0, 20 deg) Euler angles: the mean total angle is about 20 * sqrt(8 / pi) = 32 deg
    assert 25 < angle.mean() < 40
    from CorrRegLib.losses import isocenter_in_camera

    shift = isocenter_in_camera(pose, iso) - isocenter_in_camera(truth, iso)
    std = shift.std(0)
    assert 22 < std[0] < 38 and 22 < std[1] < 38 and 45 < std[2] < 75  # 30 / 30 / 60 mm, clipped at 2.5 sigma
    assert shift.abs().max(0).values[2] <= 2.5 * 60 + 1e-6


def test_one_training_step_changes_the_weights(phantom, tmp_path):
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in CorrelationNet(NetConfig.from_preset("compact", **TINY)).state_dict().items()}
    res = train([phantom.volume], CAMERA, tmp_path, steps=1, seed=0, n_validation=2, **FAST)
    after = _weights(tmp_path)
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert res.steps == 1 and len(res.history) == 1
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["model"]["input_size"] == 32 and cfg["camera"]["size_px"] == [32, 32]
    assert cfg["training"]["arguments"]["seed"] == 0 and "normalisation" in cfg["model"]
    assert (tmp_path / OPTIMIZER_FILE).is_file()


def test_short_seeded_run_lowers_appro_loss(short_run):
    # the training batches are small and noisy: their loss must fall, by how much is measured
    # below on a fixed held-out set
    appro = [h["appro"] for h in short_run.history]
    assert len(appro) == SHORT_STEPS
    first, last = sum(appro[:10]) / 10, sum(appro[-10:]) / 10
    assert last < first, (first, last)
    # L_appro (0 = aligned, 4 = orthogonal, 8 = opposite) on the same held-out cases before and after
    before, after = short_run.validation[0]["appro_loss"], short_run.validation[-1]["appro_loss"]
    assert after < before - 0.5, (before, after)


def test_training_turns_the_pose_gradient_towards_the_truth(short_run):
    """Held-out poses from the paper protocol: the share where the network's descent direction
    has a positive cosine with the direction to the truth (rotation and translation parts)."""
    before, after = short_run.validation[0], short_run.validation[-1]
    assert before["step"] == 0 and after["step"] == SHORT_STEPS
    gain_r = after["rotation_share"] - before["rotation_share"]
    gain_t = after["translation_share"] - before["translation_share"]
    assert gain_r + gain_t > 0.25, (before, after)
    assert after["translation_share"] > 0.6 and after["rotation_share"] > 0.5, after


def test_saved_model_reloads_with_identical_outputs(short_run, phantom):
    net, cfg = load_model(short_run.out_dir)
    assert not net.training
    assert cfg["validation"][-1]["step"] == SHORT_STEPS
    fresh = CorrelationNet(NetConfig.from_dict(cfg["model"]))
    fresh.load_state_dict(_weights(short_run.out_dir))
    fresh.eval()
    x, m = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    assert torch.equal(net(x, m), fresh(x, m))


def test_resume_continues_the_same_run(phantom, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(steps=4, seed=3, n_validation=2, **FAST)
    train([phantom.volume], CAMERA, a, **kw)
    train([phantom.volume], CAMERA, b, stop_after=2, **kw)
    mid = _weights(b)
    res = train([phantom.volume], CAMERA, b, resume=True, **kw)
    assert res.steps == 4 and [h["step"] for h in res.history] == [2, 3]
    wa, wb = _weights(a), _weights(b)
    assert any(not torch.equal(mid[k], wb[k]) for k in wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), k
    with pytest.raises(ValueError, match="different network config"):
        train([phantom.volume], CAMERA, b, resume=True, **{**kw, "input_size": 64})


def test_a_fine_ct_trains_pooled_to_the_network_footprint(phantom, tmp_path):
    from CorrRegLib.volume import Volume

    v = phantom.volume  # 5 mm voxels; the 32 px network sees ~4.4 mm pixels at the isocenter
    fine = Volume(v.data.repeat_interleave(4, 0).repeat_interleave(4, 1).repeat_interleave(4, 2),
                  tuple(s / 4 for s in v.spacing), v.origin, v.direction)
    kw = dict(steps=1, seed=0, n_validation=2, **FAST)
    res = train([fine], CAMERA, tmp_path / "pooled", **kw)
    assert res.config["training"]["arguments"]["ct_pooling"] == [4]
    res = train([v], CAMERA, tmp_path / "coarse", **kw)
    assert res.config["training"]["arguments"]["ct_pooling"] == [1]
    res = train([fine], CAMERA, tmp_path / "full", voxel_slack=None, **kw)
    assert res.config["training"]["arguments"]["ct_pooling"] == [1]


# --------------------------------------------------------------------------------------------
# load_model refuses anything malformed


@pytest.fixture()
def model_copy(short_run, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(short_run.out_dir, dst)
    return dst


def test_load_model_rejects_a_corrupt_weights_file(model_copy):
    data = (model_copy / MODEL_FILE).read_bytes()
    (model_copy / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        load_model(model_copy)
    (model_copy / MODEL_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="safetensors"):
        load_model(model_copy)


def test_load_model_rejects_a_pickle(model_copy, tmp_path):
    state = load_file(str(model_copy / MODEL_FILE))
    torch.save(state, model_copy / MODEL_FILE)  # a zip-wrapped pickle under the expected name
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(model_copy)
    (model_copy / MODEL_FILE).write_bytes(pickle.dumps({"weights": 1}))
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(model_copy)


def test_load_model_rejects_a_mismatched_config(model_copy):
    cfg_path = model_copy / CONFIG_FILE
    good = json.loads(cfg_path.read_text())

    def with_model(**changes):
        cfg = json.loads(json.dumps(good))
        cfg["model"].update(changes)
        cfg_path.write_text(json.dumps(cfg))

    with_model(preset="paper", stage_channels=[16, 32, 64, 64], input_size=256, head_pool=None,
               head_hidden=[64])  # another architecture than the weights
    with pytest.raises(ValueError, match="missing|shape"):
        load_model(model_copy)
    with_model(head_hidden=[32])  # same tensor names, wrong shapes
    with pytest.raises(ValueError, match="shape"):
        load_model(model_copy)
    with_model(preset="giant")
    with pytest.raises(ValueError, match="preset"):
        load_model(model_copy)
    with_model(secret_code="import os")
    with pytest.raises(ValueError, match="unknown network config keys"):
        load_model(model_copy)
    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(model_copy)
    cfg_path.write_text(json.dumps({**good, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a CorrReg network config"):
        load_model(model_copy)
    cfg_path.unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        load_model(model_copy)


def test_load_model_rejects_tensors_of_the_wrong_shape_or_value(model_copy):
    state = load_file(str(model_copy / MODEL_FILE))
    key = next(k for k in state if k.endswith("value.weight"))
    bad = dict(state)
    bad[key] = torch.zeros(1, state[key].shape[1] + 1)
    save_file(bad, str(model_copy / MODEL_FILE))
    with pytest.raises(ValueError, match="shape"):
        load_model(model_copy)
    bad = dict(state)
    bad[key] = torch.full_like(state[key], float("nan"))
    save_file(bad, str(model_copy / MODEL_FILE))
    with pytest.raises(ValueError, match="finite"):
        load_model(model_copy)
    bad = dict(state)
    del bad[key]
    bad["extra.weight"] = torch.zeros(1)
    save_file(bad, str(model_copy / MODEL_FILE))
    with pytest.raises(ValueError, match="missing"):
        load_model(model_copy)
