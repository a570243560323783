"""The per-group heatmap layout: each group lands in its own layer's column."""

import numpy as np

from anadp.plots import layer_matrix_grid


def test_groups_outside_the_layers_get_their_own_column():
    values = {
        "encoder/layer_0/attention/query/lora_a": 1.0,
        "encoder/layer_1/attention/query/lora_a": 2.0,
        "classifier/kernel": 3.0,
        "pooler/dense/kernel": 4.0,
    }
    grid, rows, cols = layer_matrix_grid(values)
    assert rows == ["attention.query.lora_a", "classifier.kernel", "pooler.dense.kernel"]
    assert cols == ["0", "1", "outside"]
    np.testing.assert_array_equal(grid[0], [1.0, 2.0, np.nan])
    # The head is not drawn as part of transformer layer 0.
    np.testing.assert_array_equal(grid[1], [np.nan, np.nan, 3.0])
    np.testing.assert_array_equal(grid[2], [np.nan, np.nan, 4.0])


def test_layers_only_has_no_outside_column():
    grid, rows, cols = layer_matrix_grid({"encoder/layer_2/attention/value/lora_b": 5.0})
    assert cols == ["0", "1", "2"] and rows == ["attention.value.lora_b"]
    assert np.isnan(grid[0, :2]).all() and grid[0, 2] == 5.0
