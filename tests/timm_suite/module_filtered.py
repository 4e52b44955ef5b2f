"""Tests of timm's ``tests/test_models.py`` that timm runs only on models of its own modules
(``list_models(module=FEAT_INTER_FILTERS)``, e.g. timm's ``resnet``): run here on eqzoo's models,
which live in eqzoo's modules. Collected only when named on the command line, with the path of
timm's test file in ``$EQZOO_TIMM_TEST_MODELS`` and the models in ``$EQZOO_TIMM_SUITE_MODELS``.
"""
import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location("timm_test_models", os.environ["EQZOO_TIMM_TEST_MODELS"])
timm_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timm_tests)

MODELS = os.environ["EQZOO_TIMM_SUITE_MODELS"].split(",")
# timm's slowest test (it leaves it out of its own CI): run on the WRN only, whose pruning is eqzoo's
# own code (the pe ResNets inherit timm's ResNet's); it passes on the other two as well
PRUNE_MODELS = [m for m in MODELS if m.startswith("pe_wrn")]


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_intermediates_features(model_name):
    timm_tests.test_model_forward_intermediates_features(model_name, 1)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_intermediates(model_name):
    timm_tests.test_model_forward_intermediates(model_name, 1)


@pytest.mark.parametrize("model_name", PRUNE_MODELS)
def test_prune_intermediate_layers_contract(model_name):
    timm_tests.test_prune_intermediate_layers_contract(model_name)
