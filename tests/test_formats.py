"""rtfq_deploy.formats: the one home of the names host and device share."""

from __future__ import annotations

import subprocess
import sys

from rtfq_deploy import formats


def test_the_torch_registries_key_on_the_format_names():
    from rtfq_deploy.models import ARCHS
    from rtfq_deploy.quant import QUANTIZERS

    assert tuple(ARCHS) == formats.ARCH_NAMES
    assert tuple(QUANTIZERS) == formats.QUANTIZER_NAMES


def test_the_cli_offers_the_format_names():
    from rtfq_deploy.cli.init import init

    choices = {p.name: getattr(p.type, "choices", None) for p in init.params}
    assert tuple(choices["arch"]) == formats.ARCH_NAMES
    assert tuple(choices["quantizer"]) == formats.QUANTIZER_NAMES + tuple(formats.QUANTIZER_ALIASES)
    assert set(formats.QUANTIZER_ALIASES.values()) <= set(formats.QUANTIZER_NAMES)
    assert set(formats.LEGACY_QUANTIZER_NAMES.values()) <= set(formats.QUANTIZER_NAMES)


def test_device_modules_use_the_same_names():
    from rtfq_deploy import images, manifest
    from rtfq_deploy.bench import images as bench_images, runtimes

    assert manifest.RUNTIMES is runtimes.RUNTIMES is formats.RUNTIMES
    assert manifest.DEFAULT_RUNTIME == formats.DEFAULT_RUNTIME == formats.RUNTIMES[0]
    assert images.IMAGE_SUFFIXES is bench_images.IMAGE_SUFFIXES is formats.IMAGE_SUFFIXES
    assert images.CROP_FRACTION is formats.CROP_FRACTION


def test_metadata_keys_share_the_prefix():
    keys = [v for k, v in vars(formats).items() if k.startswith("META_")]
    assert len(keys) == len(set(keys)) == 14
    assert all(k.startswith(formats.METADATA_PREFIX) for k in keys)


def test_normalization_of_a_checkpoint():
    own = {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert formats.normalization_of({"normalization": own}) is own
    assert formats.normalization_of({}) == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_it_imports_nothing_outside_the_standard_library():
    """Devices import it without torch, numpy or onnx (the import contract checks the package's own imports)."""
    code = ("import sys; import rtfq_deploy.formats; "
            "print(sorted(m for m in ('torch', 'numpy', 'onnx', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
