"""Data stage: dataset YAMLs, the YOLO dataset and loader, augmentation, label checks and converters' shared code."""
