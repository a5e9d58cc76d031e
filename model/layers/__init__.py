r"""Building blocks shared by the methods: masked pooling, correlation, center-pivot 4D conv, HPN learner."""
from model.layers.conv4d import CenterPivotConv4d
from model.layers.correlation import multilayer_correlation
from model.layers.learner import HPNLearner
from model.layers.pooling import mask_features, masked_average_pooling, resize_mask

__all__ = ['CenterPivotConv4d', 'HPNLearner', 'mask_features', 'masked_average_pooling', 'multilayer_correlation',
           'resize_mask']
