"""Rewards: callables ``(images, prompts, metadata) -> tensor[B]`` registered by name."""

from flowopd.rewards.base import REWARDS, RewardFn, get_reward, register_reward

__all__ = ["REWARDS", "RewardFn", "get_reward", "register_reward"]
