"""Torch-free dataset layer: DIOR / DOTA / COCO readers into one record type, bad-input reporting, COCO writing,
DOTA patch splitting, synthetic scenes and statistics.

Everyone reads data through `load_dataset(format, root, split, classes=None, strict=False, report=None)`.
Heavier pieces (synthetic generation, splitting, stats) are imported from their modules on demand.
"""
from runtime.data.classes import DIOR_CLASSES, DOTA_V1_0, DOTA_V1_5, class_index, class_list
from runtime.data.coco import to_coco_dict, write_coco
from runtime.data.loader import FORMATS, DataProblemWarning, default_split, detect_format, load_dataset
from runtime.data.problems import ProblemReport

__all__ = [
    "DIOR_CLASSES",
    "DOTA_V1_0",
    "DOTA_V1_5",
    "FORMATS",
    "DataProblemWarning",
    "ProblemReport",
    "class_index",
    "class_list",
    "default_split",
    "detect_format",
    "load_dataset",
    "to_coco_dict",
    "write_coco",
]
