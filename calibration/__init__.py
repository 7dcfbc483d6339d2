"""Images in, activation ranges out: ImageNet readers (`datasets`), deterministic sampling (`sampling`),
per-model preprocessing (`preprocess`) and the calibration statistics (`statistics`)."""

METHODS = ("minmax", "percentile", "entropy", "mse")  # how activation ranges are chosen (calibration.statistics)
