"""Subnet ids and plan files: the one subnet value (resolution, width, bit plan)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rtfq_deploy.checkpoint import load_checkpoint, safe_torch_load, save_checkpoint
from rtfq_deploy.costs import costs_of, subnet_costs
from rtfq_deploy.errors import CheckpointError, RtfqError
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.planfile import free_quantizers, load_plans, plan_document, read_plan, resolve_plan, write_plan
from rtfq_deploy.space import MixedBits, SearchSpace, SpaceError, SubnetConfig, split_id

SPACE = SearchSpace(resolutions=(64, 48), widths=(1.0, 0.6), bits=(8, 4))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE))


def _mixed(model, resolution=48, width=0.6, low=("layer3", "layer4")) -> SubnetConfig:
    bits = {n: int(b) for n, b in model.plan(SubnetConfig(resolution, width, 8)).as_dict().items()}
    bits.update({n: 4 for n in free_quantizers(model) if n.startswith(low)})
    return model.subnet(resolution, width, bits)


def test_mixed_ids_are_canonical_and_short(model):
    cfg = _mixed(model)
    assert not cfg.uniform and str(cfg).startswith("r48-w0.60-m") and len(str(cfg)) == len("r48-w0.60-m") + 8
    shuffled = list(cfg.bits.as_dict().items())
    random.Random(0).shuffle(shuffled)
    assert SubnetConfig(48, 0.6, MixedBits(tuple(shuffled))) == cfg  # the order given does not matter
    assert str(SubnetConfig(64, 1.0, cfg.bits)).endswith(cfg.bits.digest)
    assert split_id(str(cfg)) == (48, 0.6, None, cfg.bits.digest)
    assert split_id("r160-w0.73-q4") == (160, 0.73, 4, None)
    with pytest.raises(SpaceError, match="is a mixed-precision subnet: give its plan file"):
        SubnetConfig.parse(str(cfg))
    for bad in ("r48-w0.60-mXYZ", "r48-w0.60-m1234567", "r0-w0.60-q4", "r48-w0.60-q9", "nonsense"):
        with pytest.raises(SpaceError):
            split_id(bad)


def test_a_plan_equal_to_a_uniform_subnet_keeps_its_uniform_id(model):
    for q in SPACE.bits:
        bits = model.plan(SubnetConfig(64, 0.6, q)).as_dict()
        assert model.subnet(64, 0.6, bits) == SubnetConfig(64, 0.6, q)


def test_mixed_plans_are_checked_against_the_supernet(model):
    bits = {n: int(b) for n, b in model.plan(SubnetConfig(48, 0.6, 4)).as_dict().items()}
    free = free_quantizers(model)
    cases = [
        ({**bits, "nope.q": 4}, "names nope.q, which tiny_resnet does not have"),
        ({k: v for k, v in bits.items() if k != free[0]}, f"has no entry for {free[0]}"),
        ({**bits, free[0]: 6}, "keep step sizes for 8, 4 bits"),
        ({**bits, "conv1.weight_quant": 4}, "fixed at 8 bits by the supernet's policy"),
        ({**bits, free[0]: 9}, "expected an integer from 2 to 8"),
        ({**bits, free[0]: "4"}, "expected an integer from 2 to 8"),
        ({**bits, free[0]: True}, "expected an integer from 2 to 8"),
    ]
    for plan, needle in cases:
        with pytest.raises(SpaceError, match=needle):
            model.subnet(48, 0.6, plan)
    with pytest.raises(SpaceError, match="resolution 32"):
        model.subnet(32, 0.6, bits)


def test_costs_follow_every_quantizers_bits(model):
    cfg = _mixed(model)
    q8, q4 = (subnet_costs(model, SubnetConfig(48, 0.6, q)) for q in (8, 4))
    mixed = subnet_costs(model, cfg)
    assert mixed.macs == q8.macs == q4.macs
    assert q4.bitops < mixed.bitops < q8.bitops and q4.weight_bytes < mixed.weight_bytes < q8.weight_bytes
    plan = model.plan(cfg)
    inputs = model.layer_inputs()
    for layer in mixed.layers:  # BitOPs read the quantizer each layer reads, so shared inputs count for both readers
        assert layer.weight_bits == plan[f"{layer.name}.weight_quant"] and layer.act_bits == plan[inputs[layer.name]]
    assert costs_of(model, [cfg, SubnetConfig(48, 0.6, 8)]) == {cfg: mixed, SubnetConfig(48, 0.6, 8): q8}


def test_plan_files_round_trip_and_refuse_edits(model, tmp_path):
    cfg = _mixed(model)
    doc = plan_document(model, cfg, subnet_costs(model, cfg).to_dict())
    path = tmp_path / "p.json"
    write_plan(path, doc)
    assert resolve_plan(model, read_plan(path)) == cfg
    with pytest.raises(FileExistsError):
        write_plan(path, doc)
    assert load_plans(model, [path, tmp_path]) == [cfg]  # a file and its folder: once
    edited = dict(doc, bits={**doc["bits"], free_quantizers(model)[0]: 4 if doc["bits"][free_quantizers(model)[0]] == 8 else 8})
    path.write_text(json.dumps(edited))
    with pytest.raises(RtfqError, match=f"names subnet {cfg} but its bits are those of r48-w0.60-m"):
        resolve_plan(model, read_plan(path))
    path.write_text(json.dumps(dict(doc, arch="resnet50")))
    with pytest.raises(RtfqError, match="a plan for 'resnet50', the checkpoint is 'tiny_resnet'"):
        resolve_plan(model, read_plan(path))


@pytest.mark.parametrize("change,needle", [
    ({"format": "x"}, "not an rtfq plan file"), ({"version": 2}, "version 2 is not supported"),
    ({"resolution": "48"}, "\"resolution\" must be an integer"), ({"resolution": 5000}, "resolution must be between"),
    ({"width": None}, "\"width\" must be a number"), ({"width": 1.5}, "width must be in (0, 1]"),
    ({"bits": []}, "\"bits\" must map"), ({"bits": {}}, "\"bits\" must map"), ({"subnet": 3}, "must be a string"),
    ({"subnet": "r48-w0.60-mzz"}, "malformed subnet id"),
])
def test_malformed_plan_files_are_one_error(model, tmp_path, change, needle):
    cfg = _mixed(model)
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**plan_document(model, cfg, {}), **change}))
    with pytest.raises(RtfqError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_plan(path)


def test_checkpoints_store_plans_and_stats_per_id(model, tmp_path):
    cfg = _mixed(model)
    stats = {m.name: (torch.zeros(m.num_features), torch.ones(m.num_features)) for m in model.modules()
             if type(m).__name__ == "SlimBatchNorm2d"}
    path = tmp_path / "c.pt"
    with pytest.raises(RtfqError, match="without its plan"):
        save_checkpoint(path, model, bn_stats={str(cfg): stats})
    assert not path.exists()
    save_checkpoint(path, model, plans={str(cfg): cfg})
    ckpt = load_checkpoint(path)
    assert ckpt.plans == {str(cfg): cfg} and ckpt.resolve(str(cfg)) == cfg
    assert ckpt.subnets() == list(SPACE) + [cfg]
    with pytest.raises(RtfqError, match="is not stored in this checkpoint"):
        ckpt.resolve(str(SubnetConfig(64, 1.0, cfg.bits)))


def test_checkpoints_written_before_plans_existed_still_load(model, tmp_path):
    path = tmp_path / "old.pt"
    save_checkpoint(path, model)
    payload = safe_torch_load(path)
    del payload["plans"]
    torch.save(payload, path)
    ckpt = load_checkpoint(path)
    assert ckpt.plans == {} and ckpt.subnets() == list(SPACE)


def test_a_colliding_id_is_refused_not_merged(model, tmp_path):
    """Two real plans whose 8-hex-digit ids collide (found by search): a checkpoint
    holding both is refused, so an id never names two networks."""
    base = {n: int(b) for n, b in model.plan(SubnetConfig(48, 0.6, 8)).as_dict().items()}
    rng, seen, pair = random.Random(0), {}, None
    for _ in range(400_000):
        bits = {**base, **{n: rng.choice((8, 4)) for n in free_quantizers(model)}}
        mixed = MixedBits.of(bits)
        other = seen.setdefault(mixed.digest, mixed)
        if other != mixed:
            pair = (other, mixed)
            break
    assert pair is not None
    path = tmp_path / "c.pt"
    save_checkpoint(path, model)
    payload = safe_torch_load(path)
    payload["plans"] = json.dumps([{"resolution": 48, "width": 0.6, "bits": p.as_dict()} for p in pair])
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="two stored plans share the id r48-w0.60-m"):
        load_checkpoint(path)


# -- plan files that say two things, or another checkpoint's bits ----------------------------------------------

def _plan_text(model, tmp_path, config) -> str:
    path = tmp_path / "p.json"
    write_plan(path, plan_document(model, config, subnet_costs(model, config).to_dict()), overwrite=True)
    return path.read_text()


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace('"resolution": 48,', '"resolution": 48, "resolution": 64,', 1), "the key 'resolution' twice"),
    (lambda t: t.replace('"version": 1,', '"version": 1, "version": 1,', 1), "the key 'version' twice"),
    (lambda t: t.replace('"version": 1,', '"version": true,', 1), "plan file version True is not supported"),
])
def test_plan_files_with_duplicate_keys_or_a_boolean_version_are_refused(model, tmp_path, edit, needle):
    text = _plan_text(model, tmp_path, _mixed(model))
    (tmp_path / "bad.json").write_text(edit(text))
    with pytest.raises(RtfqError, match=needle):
        read_plan(tmp_path / "bad.json")


def test_plan_bits_are_checked_against_each_roles_candidates(tmp_path):
    """The supernet keeps 8-bit step sizes on every quantizer (the policy's fixed roles
    need them), but on a 6/4/2 space a free quantizer never trains at 8: a plan giving it
    8 (another checkpoint's plan, say) is refused, though the bits exist."""
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("tiny_resnet", num_classes=3,
                                          space=SearchSpace(resolutions=(48,), widths=(1.0,), bits=(6, 4, 2))))
    bits = {n: int(b) for n, b in model.plan(SubnetConfig(48, 1.0, 4)).as_dict().items()}
    free = free_quantizers(model)
    bits.update({n: 8 for n in free[:3]})
    config = model.subnet(48, 1.0, bits)  # the supernet's own check lets it through: 8 is among its bits
    (tmp_path / "p.json").write_text(json.dumps({"format": "rtfq-plan", "version": 1, "resolution": 48,
                                                 "width": 1.0, "bits": config.bits.as_dict()}))
    with pytest.raises(RtfqError, match=f"{free[0]} at 8 bits; its role .* takes the space's bit-widths 6, 4, 2"):
        resolve_plan(model, read_plan(tmp_path / "p.json"))


def test_free_quantizers_are_those_the_policy_leaves_to_the_plan(model):
    roles = dict((n, q.role) for n, q in model.quantizers())
    free = free_quantizers(model)
    assert free and set(free) < set(roles)
    assert all(model.config.policy.fixed_bits(roles[n]) is None for n in free)
    assert {roles[n] for n in set(roles) - set(free)} <= {"first", "last", "residual"}
