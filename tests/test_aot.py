"""Ahead-of-time compilation for TPU slices: accelerator types to JAX topologies. (The compile
itself needs the libtpu package, which the test extra leaves out: 700 MB; its measured results
are in docs/scale-out.md.)"""

import pytest

from bert_jax.aot import topology_name


@pytest.mark.parametrize("accelerator_type, topology", [
    ("v5e-16", "v5e:4x4"), ("v5litepod-64", "v5e:8x8"), ("v4-32", "v4:2x2x4"),
    ("v4-8", "v4:2x2x1"), ("v5p-128", "v5p:4x4x4"), ("v6e-256", "v6e:16x16"),
])
def test_accelerator_types_map_to_topologies_with_their_chip_count(accelerator_type, topology):
    assert topology_name(accelerator_type) == topology


@pytest.mark.parametrize("accelerator_type, words", [
    ("v9-8", "expected e.g. v4-32"), ("v5e-12", "12 chips"), ("v4-3", "1 chips"),
])
def test_unknown_types_and_shapes_are_refused(accelerator_type, words):
    with pytest.raises(ValueError, match=words):
        topology_name(accelerator_type)
