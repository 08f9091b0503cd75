"""filetypes.py's table of GGML types against gguf-py's own (an independent statement of the spec)."""
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tpllama.filetypes import DTYPES, GGML_TYPES, ggml_type_name


@pytest.mark.parametrize("name", sorted(GGML_TYPES))
def test_each_ggml_type_has_gguf_pys_number_and_block_geometry(name):
    number, block_size, block_bytes = GGML_TYPES[name]
    qtype = GGMLQuantizationType[name]
    assert number == qtype.value
    assert (block_size, block_bytes) == GGML_QUANT_SIZES[qtype]
    assert (DTYPES[name].block_size, DTYPES[name].block_bytes) == (block_size, block_bytes)


def test_type_numbers_outside_the_table_are_named_by_gguf_py_and_unknown_ones_refused():
    assert ggml_type_name(GGMLQuantizationType.IQ2_XXS.value) == "IQ2_XXS"
    with pytest.raises(ValueError):
        ggml_type_name(9999)


def test_loading_a_model_does_not_import_gguf_py():
    # gguf-py imports yaml and costs every start ~70 ms; only conversion and odd types need it
    code = "import sys, tpllama.engine, tpllama.tokenizer; print('gguf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_rows_of_each_block_type_widen_to_gguf_pys_values(name):
    from gguf import quants
    from gguf_writer import random_kquant
    qtype = GGMLQuantizationType[name]
    rng = np.random.default_rng(7)
    if name.endswith("_K"):       # gguf-py has no K-quantizer: random valid blocks
        raw = random_kquant(19, 512, qtype, rng)
    else:
        raw = quants.quantize(rng.standard_normal((19, 512)).astype(np.float32), qtype)
    want = quants.dequantize(raw, qtype).astype(np.float32)
    assert np.array_equal(DTYPES[name].dequantize(raw), want)
    assert np.array_equal(DTYPES[name].dequantize(raw[3:5]), want[3:5])     # a gather of a few rows
