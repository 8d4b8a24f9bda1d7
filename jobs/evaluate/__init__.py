"""The evaluate stage: teacher, base and distilled student on held-out problems, per reasoning
category, with intervals; recovery, forgetting, template overfitting, calibration and cost."""
