"""qonnx.core.config and config_activations: scheme configs validate, resolve their algorithm and serialize."""

from __future__ import annotations

import json

import pytest

import qonnx
from qonnx.core.algos import AWQ, GPTQ, HQQ
from qonnx.core.config import W2A16, W3A16, W4A16
from qonnx.core.config_activations import FP8, W4A8, W8A8, Calibration, Dynamic
from qonnx.core.errors import ConfigError
from qonnx.core.schemes import SCHEMES


def test_activation_configs():
    assert W8A8().weight_config().bits == 7 and W8A8().weight_config().block_size is None  # int8 kept to 7 bits
    assert W8A8(target="cuda").weight_config().bits == 8 and W8A8(weight_range="full").weight_config().bits == 8
    assert W4A8().weight_config().block_size == 128 and W4A8().weight_config().format == "qdq"
    assert FP8().weight_config().grid == "fp8" and FP8().calibration.method == "minmax"
    gptq = FP8(calibration=Calibration(data="x.npz", samples=3, method="minmax")).weight_config().gptq
    assert gptq is not None and (gptq.calib_data, gptq.calib_samples) == ("x.npz", 3)  # FP8 default: GPTQ
    assert FP8(algo="rtn").weight_config().gptq is None and W8A8().weight_config().gptq is None
    assert FP8().to_dict()["algo"]["name"] == "gptq" and FP8(algo="rtn").to_dict()["algo"] == "rtn"
    assert W8A8(target="tensorrt").act_symmetric  # TensorRT takes symmetric int8 only
    assert Dynamic().weight_config().accuracy_level == 4
    for bad in [dict(smooth_quant=2.0), dict(smooth_quant="yes"), dict(target="tpu"), dict(weight_bits=3)]:
        with pytest.raises(ConfigError):
            W8A8(**bad)
    with pytest.raises(ConfigError, match="fp8"):
        FP8(weight_bits=4)
    with pytest.raises(ConfigError, match="method"):
        Calibration(method="kl")
    json.dumps(W8A8().to_dict())


def test_gptq_config():
    cfg = W4A16(algo="gptq")
    assert cfg.gptq == GPTQ() and W4A16().gptq is None
    assert cfg.to_dict()["algo"]["name"] == "gptq" and json.dumps(cfg.to_dict())
    assert hash(cfg) == hash(W4A16(algo=GPTQ()))
    for bad in [dict(algo="smoothquant"), dict(algo=GPTQ)]:
        with pytest.raises(ConfigError, match="algo"):
            W4A16(**bad)
    for bad in [dict(damp=0), dict(calib_samples=0), dict(calib_seq_len=1), dict(block=0), dict(act_order=1)]:
        with pytest.raises(ConfigError, match="gptq"):
            GPTQ(**bad)


def test_hqq_config():
    cfg = W4A16(algo="hqq")
    assert cfg.hqq == HQQ() and cfg.gptq is None and cfg.calibrated is None
    assert cfg.to_dict()["algo"]["name"] == "hqq" and json.dumps(cfg.to_dict())
    for bad in [dict(iterations=0), dict(lp_norm=0), dict(beta=0), dict(kappa=0.5)]:
        with pytest.raises(ConfigError, match="hqq"):
            HQQ(**bad)
    with pytest.raises(ConfigError, match="symmetric"):
        W4A16(algo="hqq", symmetric=True)
    assert SCHEMES["w3a16"] is W3A16 and SCHEMES["w2a16"] is W2A16
    assert qonnx.W3A16().bits == 3 and qonnx.W2A16().bits == 2


def test_awq_config():
    assert W4A16(algo="awq").awq == AWQ() and W4A16(algo="awq").gptq is None
    both = W4A16(algo="awq+gptq")
    assert both.gptq == GPTQ() and both.calibrated == AWQ(gptq=GPTQ())
    assert json.dumps(both.to_dict()) and both.to_dict()["algo"]["name"] == "awq+gptq"
    for bad in [dict(grid=0), dict(clip_search=1), dict(calib_samples=0), dict(gptq="gptq")]:
        with pytest.raises(ConfigError, match="awq"):
            AWQ(**bad)


def test_sequential_gptq_config():
    with pytest.raises(ConfigError, match="sequential GPTQ applies to algo 'gptq' alone"):
        AWQ(gptq=GPTQ(sequential=True))
    with pytest.raises(ConfigError, match="sequential GPTQ applies to weight-only schemes"):
        W4A8(algo=GPTQ(sequential=True))
    with pytest.raises(ConfigError, match="sequential must be True or False"):
        GPTQ(sequential=1)


def test_embeddings_config():
    assert W4A16().embeddings is None and "embeddings" not in W4A16().to_dict()  # metadata as before by default
    assert W4A16(embeddings=8).to_dict()["embeddings"] == 8
    for bad in (3, 16, True, "4"):
        with pytest.raises(ConfigError, match="embeddings must be 4, 8 or None"):
            W4A16(embeddings=bad)
    with pytest.raises(ConfigError, match="need format='matmulnbits'"):
        W4A16(embeddings=4, format="qdq")
    with pytest.raises(ConfigError, match="need format='matmulnbits'"):
        qonnx.NF4(embeddings=4)
