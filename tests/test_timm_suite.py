"""timm's own model test-suite (``tests/test_models.py`` of the installed timm's sdist, fetched
through pip and cached, see ``timm_sources.py``) on a subset of eqzoo's models: pe_resnet18,
pe_wrn16_8 and pe_resnet18 over O(2) (registered as ``pe_resnet18_o2`` by
``timm_suite/eqzoo_timm_suite.py``, the module timm's test file imports as ``$TORCH_BACKEND``).

Every test that timm's file selects for these models must pass, except the two TorchScript ones,
which must fail with eqzoo's message (the models do not script; their export does, see
test_models.py). The tests timm runs only on its own modules (forward_intermediates, and the
pruning contract on the WRN) run on them through ``timm_suite/module_filtered.py``.
"""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

from timm_sources import ROOT, subprocess_env, timm_sdist

MODELS = ["pe_resnet18", "pe_wrn16_8", "pe_resnet18_o2"]
# what timm's file selects for a model of a module of its own (besides module-filtered tests)
EXPECTED = {"test_model_forward", "test_model_backward", "test_model_default_cfgs", "test_model_forward_features",
            "test_model_forward_fx", "test_model_backward_fx", "test_model_forward_torchscript",
            "test_model_forward_fx_torchscript"}
TORCHSCRIPT = {"test_model_forward_torchscript", "test_model_forward_fx_torchscript"}
FILTERED = {"test_model_forward_intermediates_features", "test_model_forward_intermediates"}
PRUNE_CONTRACT = "test_prune_intermediate_layers_contract"  # the WRN only: see module_filtered.py


def _model_of(case_name: str) -> str:
    """The model of a test id such as ``test_model_forward[1-pe_resnet18]``."""
    params = case_name.partition("[")[2].rstrip("]").split("-")
    return next(p for p in params if p in MODELS)


def test_timm_model_suite(tmp_path):
    sdist = timm_sdist()
    report = tmp_path / "report.xml"
    # "pe_resnet18" also selects pe_resnet18_o2; -p no:cacheprovider keeps the cached sdist clean
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning",
           "tests/test_models.py", str(ROOT / "tests" / "timm_suite" / "module_filtered.py"),
           "-k", "pe_resnet18 or pe_wrn16_8", f"--junitxml={report}"]
    env = subprocess_env(TORCH_BACKEND="eqzoo_timm_suite", EQZOO_TIMM_TEST_MODELS=str(sdist / "tests" / "test_models.py"),
                         EQZOO_TIMM_SUITE_MODELS=",".join(MODELS))
    res = subprocess.run(cmd, cwd=sdist, env=env, capture_output=True, text=True, timeout=900)
    assert report.is_file(), res.stdout[-3000:] + res.stderr[-3000:]

    outcomes = defaultdict(dict)  # model -> {test function: (outcome, message)}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        outcome = "skipped" if case.find("skipped") is not None else "failed" if bad is not None else "passed"
        outcomes[_model_of(name)][name.partition("[")[0]] = (outcome, "" if bad is None else bad.get("message", ""))

    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-500:]
    for model in MODELS:
        ran = outcomes[model]
        expected = EXPECTED | FILTERED | ({PRUNE_CONTRACT} if model.startswith("pe_wrn") else set())
        assert expected <= set(ran), (model, sorted(set(ran)), summary)
        for test, (outcome, message) in ran.items():
            if test in TORCHSCRIPT:
                assert outcome == "failed" and "does not compile to TorchScript" in message, (model, test, message)
            else:
                assert outcome == "passed", (model, test, outcome, message[:2000])
