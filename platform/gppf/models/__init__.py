"""Models: the trunks, the neck, language encoders and the composite model.

Importing the package registers the bundled trunks (static timm, lego ResNet, Swin), as timm's
`timm.models` registers its architectures.
"""

from gppf.models import backbone, lego, swin  # noqa: F401  (registration)
