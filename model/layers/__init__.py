r"""Building blocks shared by the methods: masked pooling, correlation, center-pivot 4D conv, HPN learner."""
from model.layers.anchor import (anchor_factor, cholesky_psd, dense_transform_matrix, normalize_rows, pinv_sym2x2,
                                 rank2_coefficients)
from model.layers.conv import Conv2d, conv2d
from model.layers.conv4d import CenterPivotConv4d
from model.layers.correlation import at_least_fp32, multilayer_correlation
from model.layers.learner import HPNLearner
from model.layers.pooling import mask_features, masked_average_pooling, resize_mask, resized_masks

__all__ = ['CenterPivotConv4d', 'Conv2d', 'HPNLearner', 'anchor_factor', 'at_least_fp32', 'cholesky_psd',
           'dense_transform_matrix', 'mask_features', 'masked_average_pooling', 'multilayer_correlation',
           'normalize_rows', 'pinv_sym2x2', 'rank2_coefficients', 'resize_mask', 'resized_masks', 'conv2d']
