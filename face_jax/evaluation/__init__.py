"""Evaluation: full-ranking Recall@K and NDCG@K on the device."""

from face_jax.evaluation.ranking import (
  RankingTask,
  prepare_ranking,
  rank_metrics,
)

__all__ = ["RankingTask", "prepare_ranking", "rank_metrics"]
