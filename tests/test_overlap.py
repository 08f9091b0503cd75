"""Prefill whose all-reduces overlap compute (issue 15 item 1): micro-batches of a prompt chunk,
one's sum travelling while the next computes, give bit-identical logits and text; a failure in
the middle leaves no rank behind."""
import pytest

from mpi_util import run_script


@pytest.mark.mpi
def test_overlapped_prefill_is_bit_identical_and_fails_cleanly(smollm2):
    r = run_script(2, "overlap.py", smollm2, timeout=240)
    assert r["micro_batches"] == [1, 2]
    assert r["same_logits"] and r["same_short_logits"] and r["same_text"]
    layers = 30
    assert r["reduces_40"] == [2 * layers, 4 * layers]      # two micro-batches of 20 rows
    assert r["reduces_8"] == [2 * layers, 2 * layers]       # too short to split
    rank0, rank1 = r["failure"]
    assert rank0 == rank1 and rank0[0] == "ZeroDivisionError" and "injected in an overlapped prefill" in rank0[1]
    assert r["text_after_failure"]
