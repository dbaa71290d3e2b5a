"""Export every registered domain to ONNX and TorchScript bundles; the bundle agrees with the checkpoint."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

from pipelines.domain_registry import available_domains, get_domain
from pipelines.export import export_checkpoint, load_task
from pipelines.run import main as run_main
from tests.conftest import run_pipeline
from tests.helpers import tiny_diffusion
from tests.processes import run_child

DOMAINS = available_domains()
ATOL = 1e-4


@pytest.fixture
def trained(tiny_run):
    """Each domain's tiny run (tests/conftest.py: trained once per session); export only reads it."""
    return tiny_run


def reference_outputs(domain: str, ckpt, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """What the checkpoint's own module computes (the ExportSpec module, in PyTorch)."""
    spec = get_domain(domain)
    task, state, _ = load_task(spec, ckpt)
    export = task.export_spec(state)
    with torch.no_grad():
        out = export.module(*(torch.from_numpy(inputs[n]) for n in export.input_names))
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("domain", DOMAINS)
def test_bundle_matches_checkpoint_and_runs_without_project_code(domain, fmt, trained, tmp_path):
    run = trained(domain)
    ckpt = run / "checkpoints" / "best.ckpt"
    run_pipeline(domain, "export", "--ckpt_path", str(ckpt), "--format", fmt, "--output", str(tmp_path / "bundle"))
    bundle = tmp_path / "bundle"
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["domain"] == domain and metadata["format"] == fmt and metadata["parity"]["max_abs_diff"] <= ATOL
    assert metadata["git_commit"] and "torch" in metadata["packages"] and metadata["metrics"]
    assert all(spec["shape"][0] == "batch" for spec in metadata["inputs"])

    # inputs of a batch size never seen at export (dynamic batch axis), drawn in the test
    rng = np.random.default_rng(0)
    inputs = {}
    for spec in metadata["inputs"]:
        shape = [5 if not isinstance(s, int) else s for s in spec["shape"]]
        inputs[spec["name"]] = rng.random(shape).astype(spec["dtype"]) if "float" in spec["dtype"] else rng.integers(0, 2, shape).astype(spec["dtype"])
    np.savez(tmp_path / "inputs.npz", **inputs)
    code = f"""
import sys, json, numpy as np
sys.path.insert(0, {str(bundle)!r})
from runtime import Bundle
inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
out = Bundle({str(bundle)!r}).run(**inputs)
np.savez({str(tmp_path / 'out.npz')!r}, **out)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'monai', 'pipelines', 'domains', 'transformers', 'pytorch_lightning'))
print(json.dumps(heavy))
"""
    result = run_child([sys.executable, "-c", code], 120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], "the bundle runtime must not import project or training code"
    got = np.load(tmp_path / "out.npz")
    expected = reference_outputs(domain, ckpt, inputs)
    for spec, want in zip(metadata["outputs"], expected):
        np.testing.assert_allclose(got[spec["name"]], want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("domain", DOMAINS)
def test_bundle_from_another_format_version_is_refused(domain, trained, tmp_path):
    bundle = export_checkpoint(get_domain(domain), trained(domain) / "checkpoints" / "best.ckpt", "onnx", tmp_path / "b")
    metadata = json.loads((bundle / "metadata.json").read_text())
    metadata["bundle_format"] = 99
    (bundle / "metadata.json").write_text(json.dumps(metadata))
    from pipelines.bundle_runtime import Bundle

    with pytest.raises(ValueError, match="bundle format 99 is not supported by this runtime"):
        Bundle(bundle)


def test_runtime_validates_inputs(trained, tmp_path):
    from pipelines.bundle_runtime import Bundle

    bundle = Bundle(export_checkpoint(get_domain("healthcare"), trained("healthcare") / "checkpoints" / "best.ckpt", "onnx", tmp_path / "b"))
    shape = bundle.inputs["image"]["shape"]
    with pytest.raises(ValueError, match="inputs must be exactly"):
        bundle.run(pixels=np.zeros([1, *shape[1:]]))
    with pytest.raises(ValueError, match=r"input 'image': axis 2 must be"):
        bundle.run(image=np.zeros([1, shape[1], 7, shape[3]], dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        bundle.run(image=np.full([1, *shape[1:]], np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match=r"input 'image': values must lie in \[0, 1\] \(intensities by bit depth.*found 0 to 200"):
        bundle.run(image=np.concatenate([np.zeros([1, *shape[1:]]), np.full([1, *shape[1:]], 200.0)]).astype(np.float32))  # 0-255 pixels
    probabilities = bundle.run(image=np.zeros([3, *shape[1:]], dtype=np.float32))["probabilities"]
    assert probabilities.shape == (3, 3) and np.allclose(probabilities.sum(1), 1, atol=1e-5)


def test_checkpoint_naming_a_foreign_class_is_refused(trained, tmp_path):
    ckpt = torch.load(trained("healthcare") / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "subprocess.Popen"
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"'subprocess.Popen' is not in domain 'healthcare'"):  # refused before anything is imported
        load_task(get_domain("healthcare"), tmp_path / "evil.ckpt")


@pytest.mark.parametrize("class_path", ["subprocess.Popen", "domains.healthcare.networks.build_network"], ids=["outside", "not-a-subclass"])
def test_registry_runner_and_export_refuse_the_same_foreign_class(trained, tmp_path, capsys, class_path):
    """One loader (pipelines.checkpoints): a class named in a file that is not the domain's model class
    (or a subclass of it) is refused by the registry, the runner and export alike, nothing imported from outside the domain."""
    from pipelines.model_registry import ModelRegistry, RegistryError

    best = trained("healthcare") / "checkpoints" / "best.ckpt"
    registry = ModelRegistry(tmp_path / "registry", "healthcare")
    with registry.lock():
        good = registry.add_version(best, "{}", {"model_class": "domains.healthcare.model.ImageClassifier"}, "MedicalImageDataModule")
        evil = registry.add_version(best, "{}", {"model_class": class_path}, "MedicalImageDataModule")
    assert type(registry.load_model(good)).__name__ == "ImageClassifier"
    refused = r"is not in domain 'healthcare'|is not a ImageClassifier of domain 'healthcare'"
    with pytest.raises(RegistryError, match=rf"metadata.json: model class '{class_path}' ({refused}).*refusing to load"):
        registry.load_model(evil)

    ckpt = torch.load(best, weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = class_path
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=rf"model class '{class_path}' ({refused})"):
        load_task(get_domain("healthcare"), tmp_path / "evil.ckpt")
    with pytest.raises(SystemExit) as stop:  # the runner refuses it at parse, before LightningCLI reads the class from the file
        run_main(["healthcare", "test", "--ckpt_path", str(tmp_path / "evil.ckpt"), "--runs_dir", str(tmp_path / "runs")])
    assert stop.value.code == 2 and re.search(rf"--ckpt_path \S*evil.ckpt: model class '{class_path}' ({refused})", " ".join(capsys.readouterr().err.split()))
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_checkpoint_of_another_domain_is_refused_naming_both(trained, tmp_path):
    ckpt = trained("healthcare") / "checkpoints" / "best.ckpt"  # as the runner writes it (no class path, the data module's state)
    with pytest.raises(ValueError, match=r"a checkpoint of domain 'healthcare' \(domains\.healthcare\.model\.ImageClassifier\), not of domain 'finance'; "
                       r"export it with `python -m pipelines.run healthcare export --ckpt_path "):  # fmt: skip
        export_checkpoint(get_domain("finance"), ckpt, "onnx", tmp_path / "b")
    _, diffusion_ckpt = tiny_diffusion(tmp_path)  # a subclass of media's model class, named in the checkpoint
    with pytest.raises(ValueError, match=r"a checkpoint of domain 'media' \(domains\.media\.(model|diffusion)\.Diffusion\), not of domain 'healthcare'"):
        export_checkpoint(get_domain("healthcare"), diffusion_ckpt, "onnx", tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("domain", "other", "command"), [("finance", "healthcare", "predict"), ("healthcare", "finance", "test")])
def test_the_runner_refuses_another_domains_checkpoint_naming_both(trained, tmp_path, capsys, domain, other, command):
    """``finance predict --ckpt_path <a healthcare checkpoint>`` "crashed" (exit 1, a jsonargparse message about
    threshold_method: trial finding): exit 2 naming both domains and the command that takes it, nothing written."""
    ckpt = trained(other) / "checkpoints" / "best.ckpt"
    with pytest.raises(SystemExit) as stop:
        run_pipeline(domain, command, "--ckpt_path", str(ckpt), "--runs_dir", str(tmp_path / "runs"))
    err = " ".join(capsys.readouterr().err.split())
    assert stop.value.code == 2 and "Traceback" not in err, err
    assert f"a checkpoint of domain {other!r}" in err and f"not of domain {domain!r}" in err and f"python -m pipelines.run {other} {command} --ckpt_path" in err, err
    assert not (tmp_path / "runs").exists()


def test_an_existing_output_is_never_replaced_and_the_default_folder_is_numbered(trained, tmp_path, capsys):
    """``export --output DIR`` replaced DIR and everything in it (trial finding: a user's folder of models gone, exit 0):
    an existing, non-empty ``--output`` is refused (exit 2, its files untouched, nothing written beside it); an empty one
    is used; without ``--output`` a second export writes ``export/onnx-2`` and keeps ``export/onnx`` (a server may run from it)."""
    import shutil

    run = tmp_path / "runs" / "finance" / "r1"
    shutil.copytree(trained("finance"), run)
    mine = tmp_path / "my models"
    (mine / "v1").mkdir(parents=True)
    (mine / "important.txt").write_text("do not lose")
    (mine / "v1" / "model.onnx").write_bytes(b"an earlier model")
    common = ("finance", "export", "--ckpt_path", "best", "--run_id", "r1", "--runs_dir", str(tmp_path / "runs"))
    with pytest.raises(SystemExit) as stop:
        run_pipeline(*common, "--output", str(mine))
    err = " ".join(capsys.readouterr().err.split())
    assert stop.value.code == 2 and "already exists and is not empty" in err and "Traceback" not in err, err
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == ["important.txt", "v1", "v1/model.onnx"]
    assert (mine / "important.txt").read_text() == "do not lose" and sorted(p.name for p in tmp_path.iterdir()) == ["my models", "runs"]
    (tmp_path / "empty").mkdir()
    run_pipeline(*common, "--output", str(tmp_path / "empty"))
    assert (tmp_path / "empty" / "metadata.json").is_file()
    run_pipeline(*common)
    first = (run / "export" / "onnx" / "metadata.json").read_bytes()
    run_pipeline(*common)
    assert (run / "export" / "onnx" / "metadata.json").read_bytes() == first and (run / "export" / "onnx-2" / "model.onnx").is_file()


# ----- diffusion bundles: readable by anyone, their versions recorded, the whole DDIM loop in runtime.py --------------
def test_diffusion_bundle_generates_with_numpy_and_onnxruntime_only(tmp_path):
    """``Bundle.generate`` runs the whole DDIM loop from the bundle alone; its images are the checkpoint's sampler's."""
    import os
    import platform
    import stat

    model, ckpt = tiny_diffusion(tmp_path)
    bundle = export_checkpoint(get_domain("media"), ckpt, "onnx", tmp_path / "bundle")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [bundle, *bundle.iterdir()]}
    assert modes == {"bundle": 0o755, "model.onnx": 0o644, "metadata.json": 0o644, "runtime.py": 0o644}, modes
    runtime = json.loads((bundle / "metadata.json").read_text())["runtime"]
    assert set(runtime) == {"python", "numpy", "onnx", "onnxruntime"} and runtime["python"] == platform.python_version()
    assert runtime["onnxruntime"] == __import__("onnxruntime").__version__ and runtime["numpy"] == np.__version__

    code = f"""
import sys, json, numpy as np
sys.path.insert(0, {str(bundle)!r})
from runtime import Bundle
bundle = Bundle({str(bundle)!r})
np.savez({str(tmp_path / 'out.npz')!r}, seeded=bundle.generate(count=3, seed=5, steps=7), default=bundle.generate(seed=1, labels=0))
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'monai', 'pipelines', 'domains'))
print(json.dumps(heavy))
"""
    result = run_child([sys.executable, "-c", code], 120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], "the bundle runtime must not import torch or project code"
    got = np.load(tmp_path / "out.npz")

    def sampled(seeds: list[int], labels: list[int], steps: int) -> np.ndarray:
        noise = np.stack([np.random.Generator(np.random.PCG64(s)).standard_normal((3, 8, 8), dtype=np.float32) for s in seeds])
        with torch.no_grad():
            images = model.sample(torch.from_numpy(noise), torch.tensor(labels), steps=steps, sampler="ddim")
        return ((images.clamp(-1, 1) + 1) / 2).numpy()

    want = sampled([5, 6, 7], [1, 0, 1], 7)  # labels default to (seed + i) % num_classes
    assert got["seeded"].shape == (3, 3, 8, 8) and np.abs(want - 0.5).max() > 0.1, "the images must not be flat"
    np.testing.assert_allclose(got["seeded"], want, atol=2e-3)
    np.testing.assert_allclose(got["default"], sampled([1], [0], 4), atol=2e-3)  # the bundle's sampling_steps
