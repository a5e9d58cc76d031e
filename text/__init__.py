r"""CD-TG text side: class descriptions (Text Generation Unit), CLIP text encoding and the semantic-guided plug-in."""
from text.plugin import CDTG, CDTGConfig

__all__ = ['CDTG', 'CDTGConfig']
