"""The GPU probes' argument parsers (the scripts themselves only mean something on a GPU)."""

import pytest

from sparse_prefix.experiments.bench_attention import parse_variants
from sparse_prefix.experiments.probe_hybrid import parse_variant
from sparse_prefix.experiments.probe_step_fit import parse_cases


def test_attention_variants_name_the_kernel_arguments_and_an_empty_item_is_the_default():
    assert parse_variants(";p=4,w=4;bk=128,s=1,bq=32") == [
        {}, {"parts": 4, "num_warps": 4}, {"block_k": 128, "num_stages": 1, "block_q": 32}]


@pytest.mark.parametrize("text", ["p=four", "x=1", "p", "w=-2"])
def test_attention_variants_refuse_unknown_keys_and_non_integers(text):
    with pytest.raises(ValueError, match="variant entries"):
        parse_variants(text)


def test_hybrid_probe_variants_take_the_key_parts_setting():
    assert parse_variant("kp=4,G=1") == {"kp": 4, "G": 1}
    with pytest.raises(ValueError, match="unknown variant setting"):
        parse_variant("parts=4")


def test_step_fit_cases_read_tokens_and_resume_points():
    assert parse_cases("256:0, 164:8028,100") == [(256, 0), (164, 8028), (100, 0)]
