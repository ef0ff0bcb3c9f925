"""Importing external models (certlib.checkpoints.importing, ``certify import-model``): each supported layout
is built here from a randomly initialised network, imported, and the written checkpoint's logits
on pixel-scale inputs must equal the original network's on the same inputs normalized the
original's way. Mismatched and unsafe files are refused with one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from certlib.checkpoints.checkpoint import load_checkpoint, read_card, save_checkpoint
from certlib.checkpoints.importing import import_model
from cluster.cli.importing import import_model_command

COHEN_CIFAR = ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _randomize_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine weights, so that a wrongly mapped key changes the
    logits (fresh BN layers are all identical)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


class _Normalize(nn.Module):
    """Cohen et al.'s NormalizeLayer: its constants are plain attributes, not state."""

    def __init__(self, mean, std):
        super().__init__()
        self.means, self.sds = torch.tensor(mean), torch.tensor(std)

    def forward(self, x):
        return (x - self.means.view(1, -1, 1, 1)) / self.sds.view(1, -1, 1, 1)


class _CohenBlock(nn.Module):
    """The key structure and computation of locuslab/smoothing code/archs/cifar_resnet.py's block."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _CohenResNet(nn.Module):
    def __init__(self, depth=110, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for g, (cout, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = [_CohenBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
            setattr(self, f"layer{g}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.avgpool(x).flatten(1))


class _LFBlock(nn.Module):
    """The key structure and computation of alevine0/smoothingSplittingNoise src/lib/wide_resnet.py's block."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(a))))
        return (x if self.equal else self.convShortcut(a)) + out


class _LFGroup(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(
            *[_LFBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class _LFWideResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = _LFGroup(6, 16, 32, 1), _LFGroup(6, 32, 64, 2), _LFGroup(6, 64, 128, 2)
        self.bn1, self.fc = nn.BatchNorm2d(128), nn.Linear(128, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(nn.functional.avg_pool2d(out, 8).flatten(1))


class _LFNorm(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mean).reshape(3, 1, 1), requires_grad=False)
        self.log_sig = nn.Parameter(torch.log(torch.tensor(std)).reshape(3, 1, 1), requires_grad=False)

    def forward(self, x):
        return (x - self.mu) / torch.exp(self.log_sig)


class _LFForecaster(nn.Module):
    """Their Forecaster: ``norm`` and ``model`` each inside DataParallel."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.norm, self.model = nn.DataParallel(_LFNorm(mean, std)), nn.DataParallel(net)

    def forward(self, x):
        return self.model.module(self.norm.module(x))


class _Tiny(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def tiny_factory(num_classes: int = 10) -> nn.Module:
    return _Tiny(num_classes)


def tiny_no_args() -> nn.Module:
    return _Tiny(10)


def _pixels(shape, n=2, seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def _same_logits(path: Path, original: nn.Module, normalize, shape=(3, 32, 32), n=2):
    model, card = load_checkpoint(path, trust_code=["tests.test_import"])  # a factory's code: by consent
    x = _pixels(shape, n)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original.eval()(normalize(x)))
    return card


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_cohen_cifar_resnet110_with_optimizer_state(tmp_path):
    torch.manual_seed(0)
    net = _randomize_bn(_CohenResNet())
    wrapped = nn.Sequential(_Normalize(*COHEN_CIFAR), net)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    wrapped(torch.rand(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    net.eval()
    path = tmp_path / "cifar10" / "resnet110" / "noise_0.25" / "checkpoint.pth.tar"
    path.parent.mkdir(parents=True)
    state = {
        "epoch": 90,
        "arch": "cifar_resnet110",
        "state_dict": wrapped.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(state, path)
    assert all(k.startswith("1.") for k in state["state_dict"])
    card = import_model(None, path, tmp_path / "cohen.pt", layout="cohen", dataset="cifar10")
    assert (card.architecture, card.method, card.sigma, card.std) == ("resnet110", "gaussian", 0.25, COHEN_CIFAR[1])
    assert card.source["arch"] == "cifar_resnet110" and card.source["epoch"] == 90
    _same_logits(tmp_path / "cohen.pt", net, _Normalize(*COHEN_CIFAR))
    with pytest.raises(ValueError, match="contradicts") as err:
        import_model(None, path, tmp_path / "x.pt", layout="cohen", dataset="cifar10", sigma=0.5)
    _one_line(err)


def test_cohen_imagenet_resnet50_dataparallel(tmp_path):
    import torchvision  # here: every pytest worker collects this module, and few need it

    torch.manual_seed(0)
    net = _randomize_bn(torchvision.models.resnet50())
    wrapped = nn.Sequential(_Normalize(*IMAGENET), nn.DataParallel(net))
    assert next(iter(wrapped.state_dict())).startswith("1.module.")
    torch.save({"epoch": 90, "arch": "resnet50", "state_dict": wrapped.state_dict()}, tmp_path / "c.pth.tar")
    card = import_model(
        None, tmp_path / "c.pth.tar", tmp_path / "r50.pt", layout="cohen", dataset="imagenet", sigma=0.5
    )
    assert (card.architecture, card.num_classes, card.input_shape) == ("resnet50", 1000, [3, 224, 224])
    _same_logits(tmp_path / "r50.pt", net, _Normalize(*IMAGENET), (3, 224, 224), n=1)


def test_levine_feizi_wrn_dssn(tmp_path):
    torch.manual_seed(0)
    net = _randomize_bn(_LFWideResNet())
    forecaster = _LFForecaster(net, [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
    path = tmp_path / "cifar_split_derandomized_0.5" / "model_ckpt.torch"
    path.parent.mkdir()
    torch.save(forecaster.state_dict(), path)
    assert {"norm.module.mu", "norm.module.log_sig", "model.module.block1.layer.0.convShortcut.weight"} <= set(
        forecaster.state_dict()
    )
    with pytest.raises(ValueError, match="--seed") as err:
        import_model(None, path, tmp_path / "lf.pt", layout="levine-feizi", dataset="cifar10")
    _one_line(err)
    card = import_model(None, path, tmp_path / "lf.safetensors", layout="levine-feizi", dataset="cifar10", seed=0)
    assert (card.architecture, card.method, card.sigma, card.training, card.levels) == (
        "wrn40_2",
        "dssn",
        0.5,
        "standard",
        441,
    )
    _same_logits(tmp_path / "lf.safetensors", forecaster, lambda x: x)


def test_torchvision_resnet18_and_resnet50_keys(tmp_path):
    import torchvision

    torch.manual_seed(0)
    for name in ("resnet18", "resnet50"):
        net = _randomize_bn(torchvision.models.get_model(name, num_classes=10))
        torch.save(net.state_dict(), tmp_path / f"{name}.pth")
        card = import_model(
            name,
            tmp_path / f"{name}.pth",
            tmp_path / f"{name}.pt",
            layout="torchvision",
            dataset="cifar10",
            trained_with="gaussian",
            sigma=0.25,
            mean=[0.5] * 3,
            std=[0.25] * 3,
        )
        assert card.architecture == f"torchvision:{name}" and len(card.source["file_sha256"]) == 64
        _same_logits(tmp_path / f"{name}.pt", net, lambda x: (x - 0.5) / 0.25)


@pytest.mark.parametrize("factory", ["tiny_factory", "tiny_no_args"])
def test_factory(tmp_path, factory):
    torch.manual_seed(0)
    net = _Tiny(10)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "tiny.pt")
    card = import_model(
        f"tests.test_import:{factory}",
        tmp_path / "tiny.pt",
        tmp_path / "out.pt",
        layout="factory",
        dataset="cifar10",
        trained_with="uniform",
        sigma=0.5,
    )
    assert card.architecture == f"factory:tests.test_import:{factory}"
    mean, std = torch.tensor(card.mean).view(1, 3, 1, 1), torch.tensor(card.std).view(1, 3, 1, 1)
    _same_logits(tmp_path / "out.pt", net, lambda x: (x - mean) / std)


def test_timm_is_optional(tmp_path):
    torch.save(_Tiny().state_dict(), tmp_path / "t.pt")
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install 'certify-smoothing\[timm\]'"):
            import_model(
                "resnet18",
                tmp_path / "t.pt",
                tmp_path / "o.pt",
                layout="timm",
                dataset="cifar10",
                trained_with="gaussian",
                sigma=0.25,
            )
        return
    pytest.skip("timm is installed: the path without it is not exercised")


def _tiny_file(tmp_path, state):
    torch.save(state, tmp_path / "w.pt")
    return tmp_path / "w.pt"


def _refused(path, **kwargs) -> str:
    options = {"layout": "factory", "dataset": "cifar10", "trained_with": "gaussian", "sigma": 0.25, **kwargs}
    with pytest.raises(ValueError) as err:
        import_model("tests.test_import:tiny_factory", path, path.parent / "out.pt", **options)
    return _one_line(err)


def test_mismatched_files_are_refused_with_one_line(tmp_path):
    good = _Tiny(10).state_dict()
    assert "missing keys head.bias" in _refused(
        _tiny_file(tmp_path, {k: v for k, v in good.items() if k != "head.bias"})
    )
    assert "unexpected keys extra.weight" in _refused(_tiny_file(tmp_path, {**good, "extra.weight": torch.ones(1)}))
    shape = _refused(_tiny_file(tmp_path, {**good, "conv.weight": torch.ones(4, 3, 5, 5)}))
    assert "conv.weight has shape (4, 3, 5, 5) in the file, the model expects (4, 3, 3, 3)" in shape
    classes = _refused(_tiny_file(tmp_path, _Tiny(100).state_dict()))
    assert "class count" in classes and "100 outputs, expected 10" in classes
    assert "class count" in _refused(_tiny_file(tmp_path, good), num_classes=100)
    assert "noise the model was trained with is unknown" in _refused(_tiny_file(tmp_path, good), trained_with=None)
    assert not (tmp_path / "out.pt").exists()


def test_truncated_files_are_refused(tmp_path):
    path = _tiny_file(tmp_path, _Tiny(10).state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _refused(path)
    save_checkpoint(tmp_path / "m.safetensors", *_tiny_card_model())
    data = (tmp_path / "m.safetensors").read_bytes()
    for cut in (4, 40, len(data) - 10):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated") as err:
            read_card(tmp_path / "cut.safetensors") if cut < 40 else load_checkpoint(tmp_path / "cut.safetensors")
        _one_line(err)


def _tiny_card_model():
    from certlib.checkpoints.checkpoint import ModelCard
    from certlib.checkpoints.weights import build_architecture

    model = build_architecture(
        "factory:tests.test_import:tiny_factory", 10, [0.5] * 3, [0.25] * 3, [3, 32, 32], trust_code=["tests"]
    )
    card = ModelCard(
        "factory:tests.test_import:tiny_factory",
        "cifar10",
        [str(i) for i in range(10)],
        [3, 32, 32],
        [0.5] * 3,
        [0.25] * 3,
        255,
        "gaussian",
        0.25,
        None,
        None,
        0,
        "standard",
    )
    return model, card


def test_safetensors_card_is_read_from_the_header_alone(tmp_path, monkeypatch):
    import safetensors.torch

    model, card = _tiny_card_model()
    written = save_checkpoint(tmp_path / "m.safetensors", model, card)
    header_len = int.from_bytes((tmp_path / "m.safetensors").read_bytes()[:8], "little")
    assert json.loads((tmp_path / "m.safetensors").read_bytes()[8 : 8 + header_len])["__metadata__"]["certlib_card"]

    def no_tensors(*args, **kwargs):
        raise AssertionError("read_card loaded tensors")

    monkeypatch.setattr(safetensors.torch, "load_file", no_tensors)
    monkeypatch.setattr(safetensors.torch, "load", no_tensors)
    monkeypatch.setattr(safetensors, "safe_open", no_tensors)
    monkeypatch.setattr(torch, "load", no_tensors)
    assert read_card(tmp_path / "m.safetensors") == written
    monkeypatch.undo()
    loaded, again = load_checkpoint(tmp_path / "m.safetensors", trust_code=["tests.test_import"])
    assert again == written


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return "ran"


def test_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": _Tiny().state_dict(), "extra": _Payload()}, tmp_path / "evil.pt")
    message = _refused(tmp_path / "evil.pt")
    assert "pickled code" in message and not _Payload.ran


def test_cli_import_model(tmp_path):
    torch.save(_Tiny().state_dict(), tmp_path / "w.pt")
    args = [
        "tests.test_import:tiny_factory",
        "--weights",
        str(tmp_path / "w.pt"),
        "--layout",
        "factory",
        "--dataset",
        "cifar10",
        "-o",
        str(tmp_path / "m.safetensors"),
    ]
    result = CliRunner().invoke(import_model_command, args + ["--trained-with", "laplace", "--sigma", "0.5"])
    assert result.exit_code == 0, result.output
    assert "architecture  factory:tests.test_import:tiny_factory" in result.output
    assert read_card(tmp_path / "m.safetensors").method == "laplace"
    result = CliRunner().invoke(import_model_command, args + ["--sigma", "0.5"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "give --trained-with" in result.output


def digits_factory(num_classes: int = 10) -> nn.Module:
    """A user's own module for 8x8 digits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))


def test_an_imported_model_is_certified_in_a_sweep_and_tabled(tmp_path):
    """The quickstart-sized path: `certify import-model` writes the checkpoint a sweep's
    models.path names, the sweep certifies it (the worker in this process) and `certify table`
    reads the rows."""
    from certlib.analysis import load_results
    from cluster.cli import main
    from cluster.job.worker import UnitRunner
    from cluster.plan import expand, preflight
    from cluster.spec import parse_spec

    torch.manual_seed(0)
    torch.save(digits_factory().state_dict(), tmp_path / "mine.pt")
    target = tmp_path / "models" / "gaussian-standard-0.5-0.safetensors"
    args = ["import-model", "tests.test_import:digits_factory", "--layout", "factory", "--weights"]
    args += [str(tmp_path / "mine.pt"), "--dataset", "digits", "--trained-with", "gaussian", "--sigma", "0.5"]
    result = CliRunner().invoke(main, args + ["-o", str(target)])
    assert result.exit_code == 0, result.output
    sweep = parse_spec(
        {
            "name": "imported",
            "output": str(tmp_path / "out"),
            "dataset": {"name": "digits", "split": "test", "limit": 12},
            "models": {
                "path": str(tmp_path / "models" / "{method}-{training}-{sigma}-{seed}.safetensors"),
                "trust_code": ["tests.test_import"],  # the card's factory: its code runs by consent
            },
            "methods": ["gaussian"],
            "sigmas": [0.5],
            "certify": {"n0": 16, "n": 200},
            "resources": {"shard_size": 6},
        }
    )
    preflight(sweep)  # the card matches what the sweep certifies
    runner = UnitRunner(sweep.to_json(), "imported-job")
    assert runner.calibrate(read_card(target).architecture, seconds=0.1) > 0  # shard_size: auto sizes it too
    for unit in expand(sweep, 12):
        runner.certify(unit)
    rows = load_results(sweep.output)
    assert len(rows) == 12 and set(rows["model_sha256"]) == {read_card(target).weights_sha256}
    table = CliRunner().invoke(main, ["table", sweep.output, "--radii", "0", "--format", "json"])
    assert table.exit_code == 0 and json.loads(table.output)[0]["method"] == "gaussian"


USER_MODULE = """
from torch import nn


def build(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, num_classes))
"""


def test_a_users_module_is_imported_and_certified_by_a_ray_job(ray_session, tmp_path, monkeypatch):
    """The whole path as a user takes it, from their project directory: `certify import-model`
    finds their module there, a spec names the one imported model by a plain path and certifies
    it at two sigmas, and the Ray job's driver and workers (other processes, in other
    directories) build the network from the module the job ships (py_modules)."""
    from certlib.analysis import load_results
    from cluster.cli import main

    monkeypatch.chdir(tmp_path)
    module = "usernet_ray_sweep"  # a name no other test imports: the workers must get it from the job
    (tmp_path / f"{module}.py").write_text(USER_MODULE)
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command puts this directory first
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    torch.save(net.state_dict(), tmp_path / "theirs.pt")
    runner = CliRunner()
    args = ["import-model", f"{module}:build", "--layout", "factory", "--weights", "theirs.pt", "--dataset"]
    imported = runner.invoke(main, args + ["digits", "--trained-with", "gaussian", "--sigma", "0.5", "-o", "mine.pt"])
    assert imported.exit_code == 0, imported.output
    spec = {
        "name": "imported-ray",
        "output": "out",
        "dataset": {"name": "digits", "split": "test", "limit": 10},
        "models": {"path": "mine.pt", "noise": "gaussian", "sigmas": [0.5], "trust_code": [module]},
        "methods": ["gaussian"],
        "sigmas": [0.25, 0.5],
        "certify": {"n0": 16, "n": 200, "compile": False},
        "resources": {"workers": 1, "shard_size": 5},  # one worker shows it: each costs seconds of CPU
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = runner.invoke(main, ["submit-job", "spec.yaml", "--address", ray_session.dashboard_url, "--wait"])
    assert result.exit_code == 0, result.output
    assert "shipping the models' own code with the job" in result.output and "SUCCEEDED" in result.output
    rows = load_results(tmp_path / "out")
    assert len(rows) == 20 and set(rows["sigma"]) == {0.25, 0.5} and set(rows["training_sigma"]) == {0.5}
    assert set(rows["model_sha256"]) == {read_card(tmp_path / "mine.pt").weights_sha256}


@pytest.mark.parametrize(
    "architecture, shipped",
    [("factory:userpkg.nets:build", ["userpkg"]), ("factory:torchvision.models:resnet18", []), ("resnet110", [])],
)
def test_only_the_users_own_modules_are_shipped_with_a_job(tmp_path, monkeypatch, architecture, shipped):
    """A package of the user's (its whole directory) goes with the job; an installed library and
    a built-in architecture do not (tests/test_hostile_checkpoints.py has the refusals)."""
    from types import SimpleNamespace

    import certlib.checkpoints.checkpoint
    from cluster.client.submission import user_modules
    from cluster.spec import parse_spec

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "nets.py").write_text(USER_MODULE)
    for sigma in (0.25, 0.5):
        (tmp_path / f"m-{sigma}.pt").write_bytes(b"")
    monkeypatch.setattr(
        certlib.checkpoints.checkpoint, "read_card", lambda path: SimpleNamespace(architecture=architecture)
    )
    sweep = parse_spec(
        {
            "name": "ship",
            "output": str(tmp_path / "out"),
            "dataset": {"name": "digits"},
            "models": {"path": str(tmp_path / "m-{sigma}.pt"), "trust_code": ["userpkg", "torchvision"]},
            "methods": ["gaussian"],
            "sigmas": [0.25, 0.5],
        }
    )
    assert user_modules(sweep) == [str(tmp_path / name) for name in shipped]
