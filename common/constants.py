r"""Constants shared by every layer of the code."""

#: Label of pixels that neither the loss nor the metrics count (PASCAL's object boundaries, padding).
IGNORE_INDEX = 255
#: ImageNet normalisation of the backbones' inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The smallest input image side: the backbones' deepest taps are 1/32 of the image.
MIN_IMG_SIZE = 32
#: train.py's recipe where a method's own (`FewShotSegmenter.train_defaults`) and the user's flags say nothing: HSNet's.
TRAIN_DEFAULTS = {'img_size': 400, 'bsz': 20, 'epochs': 50, 'train_boundary': 'background', 'augmentation': 'none'}
#: A support mask with fewer foreground pixels than this at the model's input size is reported as degenerate.
FEW_FOREGROUND = 16
