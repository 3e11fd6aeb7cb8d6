"""PyTorch reference backbones of the original MultiFace / TreB1eN code, for parity tests and benches.

Written from the architectures in docs/original.md, with the original's module and attribute
names so that ``state_dict()`` keys are the original's (``conv1.conv.weight``,
``conv_3.model.0.conv.conv.weight``, ``body.3.res_layer.5.fc1.weight``, ``output_layer.3.weight`` ...).
NCHW, and the original's weights expect **BGR** input::

    from multiface_jax.torch_reference import create_torch_model
    model = create_torch_model('ir_se50', embedding_size=512).eval()

torch is an optional dependency (requirements-torch.txt): importing this module requires it.
"""
import torch
from torch import nn

IR_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
IR_CHANNELS = (64, 128, 256, 512)


def l2_norm(x, axis=1):
  """Rows of `x` divided by their L2 norm, as the original's ``l2_norm``."""
  return x / torch.norm(x, 2, axis, True)


class Flatten(nn.Module):
  """(B, C, H, W) -> (B, C*H*W) in PyTorch's (c, h, w) order."""

  def forward(self, x):
    return x.view(x.size(0), -1)


# ----------------------------------------------------------------------------------- MobileFaceNet


class Conv_block(nn.Module):  # pylint: disable=invalid-name  (the original's class names)
  """Conv (no bias) -> BatchNorm2d -> PReLU; children ``conv``, ``bn``, ``prelu``."""

  def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
    super().__init__()
    self.conv = nn.Conv2d(in_c, out_c, kernel_size=kernel, groups=groups, stride=stride,
                          padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(out_c)
    self.prelu = nn.PReLU(out_c)

  def forward(self, x):
    return self.prelu(self.bn(self.conv(x)))


class Linear_block(nn.Module):  # pylint: disable=invalid-name
  """Conv (no bias) -> BatchNorm2d, no activation; children ``conv``, ``bn``."""

  def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
    super().__init__()
    self.conv = nn.Conv2d(in_c, out_c, kernel_size=kernel, groups=groups, stride=stride,
                          padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(out_c)

  def forward(self, x):
    return self.bn(self.conv(x))


class Depth_Wise(nn.Module):  # pylint: disable=invalid-name
  """1x1 in->groups +BN+PReLU, depthwise 3x3 (stride) +BN+PReLU, 1x1 groups->out +BN, optional add.

  ``groups`` is the expanded width (the original's argument name).
  """

  def __init__(self, in_c, out_c, residual=False, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
               groups=1):
    super().__init__()
    self.conv = Conv_block(in_c, groups, kernel=(1, 1), padding=(0, 0), stride=(1, 1))
    self.conv_dw = Conv_block(groups, groups, groups=groups, kernel=kernel, padding=padding,
                              stride=stride)
    self.project = Linear_block(groups, out_c, kernel=(1, 1), padding=(0, 0), stride=(1, 1))
    self.residual = residual

  def forward(self, x):
    out = self.project(self.conv_dw(self.conv(x)))
    return x + out if self.residual else out


class Residual(nn.Module):
  """`num_block` residual Depth_Wise blocks at width `c`; child ``model`` (a Sequential)."""

  def __init__(self, c, num_block, groups, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
    super().__init__()
    self.model = nn.Sequential(*[
        Depth_Wise(c, c, residual=True, kernel=kernel, padding=padding, stride=stride,
                   groups=groups) for _ in range(num_block)])

  def forward(self, x):
    return self.model(x)


class MobileFaceNet(nn.Module):
  """MobileFaceNet, 112x112 NCHW input -> L2-normalised (B, embedding_size)."""

  def __init__(self, embedding_size=512):
    super().__init__()
    self.conv1 = Conv_block(3, 64, kernel=(3, 3), stride=(2, 2), padding=(1, 1))
    self.conv2_dw = Conv_block(64, 64, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64)
    self.conv_23 = Depth_Wise(64, 64, stride=(2, 2), groups=128)
    self.conv_3 = Residual(64, num_block=4, groups=128)
    self.conv_34 = Depth_Wise(64, 128, stride=(2, 2), groups=256)
    self.conv_4 = Residual(128, num_block=6, groups=256)
    self.conv_45 = Depth_Wise(128, 128, stride=(2, 2), groups=512)
    self.conv_5 = Residual(128, num_block=2, groups=256)
    self.conv_6_sep = Conv_block(128, 512, kernel=(1, 1), stride=(1, 1), padding=(0, 0))
    self.conv_6_dw = Linear_block(512, 512, groups=512, kernel=(7, 7), stride=(1, 1),
                                  padding=(0, 0))
    self.conv_6_flatten = Flatten()
    self.linear = nn.Linear(512, embedding_size, bias=False)
    self.bn = nn.BatchNorm1d(embedding_size)

  def forward(self, x):
    for layer in (self.conv1, self.conv2_dw, self.conv_23, self.conv_3, self.conv_34, self.conv_4,
                  self.conv_45, self.conv_5, self.conv_6_sep, self.conv_6_dw,
                  self.conv_6_flatten, self.linear, self.bn):
      x = layer(x)
    return l2_norm(x)


# ------------------------------------------------------------------------------------ IR / IR-SE


class SEModule(nn.Module):
  """Squeeze-excite: avg-pool, 1x1 conv C->C/reduction, ReLU, 1x1 conv back, sigmoid, rescale."""

  def __init__(self, channels, reduction):
    super().__init__()
    self.avg_pool = nn.AdaptiveAvgPool2d(1)
    self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
    self.relu = nn.ReLU(inplace=True)
    self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
    self.sigmoid = nn.Sigmoid()

  def forward(self, x):
    gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
    return x * gate


class bottleneck_IR(nn.Module):  # pylint: disable=invalid-name
  """IR unit: residual BN-conv3x3-PReLU-conv3x3(stride)-BN [-SE] plus a shortcut.

  Children ``shortcut_layer`` (MaxPool2d(1, stride) when in == depth, else Sequential(conv 1x1,
  BN)) and ``res_layer`` (Sequential: 0 BN, 1 conv, 2 PReLU, 3 conv, 4 BN[, 5 SEModule]).
  """

  def __init__(self, in_channel, depth, stride, use_se=False):
    super().__init__()
    if in_channel == depth:
      self.shortcut_layer = nn.MaxPool2d(1, stride)
    else:
      self.shortcut_layer = nn.Sequential(
          nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth))
    layers = [
        nn.BatchNorm2d(in_channel),
        nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
        nn.PReLU(depth),
        nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
        nn.BatchNorm2d(depth),
    ]
    if use_se:
      layers.append(SEModule(depth, 16))
    self.res_layer = nn.Sequential(*layers)

  def forward(self, x):
    return self.res_layer(x) + self.shortcut_layer(x)


class Backbone(nn.Module):
  """IR / IR-SE of depth 50, 100 or 152; 112x112 NCHW input -> L2-normalised (B, embedding_size).

  Children ``input_layer`` (0 conv, 1 BN, 2 PReLU), ``body`` (a flat Sequential of every unit),
  ``output_layer`` (0 BN2d, 1 Dropout, 2 Flatten, 3 Linear, 4 BN1d).
  """

  def __init__(self, num_layers, drop_ratio=0.6, mode='ir_se', embedding_size=512):
    super().__init__()
    if num_layers not in IR_UNITS:
      raise ValueError(f'num_layers must be one of {sorted(IR_UNITS)}, got {num_layers}')
    if mode not in ('ir', 'ir_se'):
      raise ValueError(f"mode must be 'ir' or 'ir_se', got {mode!r}")
    self.input_layer = nn.Sequential(
        nn.Conv2d(3, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
    self.output_layer = nn.Sequential(
        nn.BatchNorm2d(512), nn.Dropout(drop_ratio), Flatten(),
        nn.Linear(512 * 7 * 7, embedding_size), nn.BatchNorm1d(embedding_size))
    units = []
    in_channel = 64
    for depth, num_units in zip(IR_CHANNELS, IR_UNITS[num_layers]):
      for i in range(num_units):
        units.append(bottleneck_IR(in_channel, depth, 2 if i == 0 else 1,
                                   use_se=(mode == 'ir_se')))
        in_channel = depth
    self.body = nn.Sequential(*units)

  def forward(self, x):
    return l2_norm(self.output_layer(self.body(self.input_layer(x))))


def create_torch_model(net, embedding_size=512):
  """Builds the reference model named as in ``multiface_jax.models.create_model``.

  Args:
    net: 'mobilefacenet', 'ir50', 'ir100', 'ir152', 'ir_se50', 'ir_se100' or 'ir_se152'.
    embedding_size: output size.

  Returns:
    A freshly initialised ``torch.nn.Module`` (in training mode, as PyTorch builds it).
  """
  if net == 'mobilefacenet':
    return MobileFaceNet(embedding_size)
  for mode in ('ir_se', 'ir'):
    if net.startswith(mode) and net[len(mode):].isdigit():
      return Backbone(int(net[len(mode):]), mode=mode, embedding_size=embedding_size)
  raise ValueError(f'Unknown net {net!r}')


def randomize_(model, generator=None):
  """Gives every parameter and BatchNorm running statistic non-trivial random values, in place.

  Conv/Linear weights are scaled to keep activations O(1) through deep stacks; BatchNorm gets a
  random affine and random running mean/variance (so eval-mode BN is far from the identity); PReLU
  slopes are drawn in [0, 0.5]. Returns `model`.
  """
  g = generator if generator is not None else torch.Generator().manual_seed(0)

  def rand(shape, low, high):
    return torch.rand(shape, generator=g) * (high - low) + low

  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=g) / fan_in ** 0.5)
        if module.bias is not None:
          module.bias.copy_(rand(module.bias.shape, -0.1, 0.1))
      elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        n = module.num_features
        module.weight.copy_(rand((n,), 0.5, 1.5))
        module.bias.copy_(rand((n,), -0.2, 0.2))
        module.running_mean.copy_(rand((n,), -0.2, 0.2))
        module.running_var.copy_(rand((n,), 0.5, 2.0))
        module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
      elif isinstance(module, nn.PReLU):
        module.weight.copy_(rand(module.weight.shape, 0.0, 0.5))
  return model
