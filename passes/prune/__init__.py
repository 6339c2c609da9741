"""Structured pruning: channel groups from a dependency analysis, channel and layer removal."""

from .channels import PruneChannels, ShowGroups
from .groups import ChannelGroup, analyze_groups

__all__ = ["PruneChannels", "ShowGroups", "ChannelGroup", "analyze_groups"]
