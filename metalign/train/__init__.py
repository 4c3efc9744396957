"""Meta-learner training (docs/methods.md §4–§8): episodes, models and loss, the training loop, `encode`, ICL
curves and the learning-curve figure."""
