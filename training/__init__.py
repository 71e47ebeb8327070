"""Training of predictor tables; the backbone is never trained.

* :mod:`training.distill`: Stage 1, distillation against a many-step teacher (EPD-Solver, ICCV 2025).
* :mod:`training.ppo`: Stage 2, RDPO: the table as a Dirichlet policy fine-tuned with PPO on a reward
  (EPD-Solver++).
* :mod:`training.rewards`: the reward heads (HPSv2.1, PickScore, ImageReward, MPS, CLIP score, ...) and FID.
* :mod:`training.runs`: what both trainers share (configs, run folders, logs, the training loop);
  :mod:`training.features`: the feature extractors of Stage 1's perceptual losses.
"""
