r"""The names that command-line flags choose from, in one torch-free place (so that `-h` and argument errors answer
without importing torch); the modules that implement them import these and check that they cover them."""

#: Training/test precision -> the torch dtype autocast runs in (None: no autocast); engine/loops.py `PRECISIONS`.
PRECISIONS = {'fp32': None, 'bf16': 'bfloat16', 'fp16': 'float16'}
#: train.py --lr-schedule (engine/loops.py override_recipe).
SCHEDULES = ('method', 'none', 'cosine', 'poly')
#: train.py --train-boundary: what the training loss does with label-255 pixels (engine/loops.py training_batch).
BOUNDARY_POLICIES = ('background', 'ignore')
#: train.py --augmentation: training image augmentation -> its data/augment.py class (None: resized only).
AUGMENTATIONS = {'none': None, 'flip-resized-crop': 'FlipResizedCrop', 'gamma-affine-elastic': 'GammaAffineElastic'}
#: test.py --miou-over: the classes mIoU and Dice average over (common/metrics.py).
MIOU_OVER = ('all', 'seen')
#: test.py --protocol -> its engine/protocols.py class.
PROTOCOLS = {'2d': 'EpisodeProtocol', 'volumetric': 'VolumetricProtocol'}
#: test.py --volumetric-support: the support volume of a fold (engine/volumetric.py support_volume).
SUPPORT_RULES = ('qnet', 'ssl-alpnet')
#: test.py --match-shots (model/base.py FewShotSegmenter.match_shots).
MATCH_SHOTS = ('auto', 'all', 'one')
