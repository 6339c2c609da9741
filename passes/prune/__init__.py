"""Structured pruning: channel groups from a dependency analysis, channel and layer removal."""

from .channels import PruneChannels, ShowGroups
from .groups import ChannelGroup, analyze_groups
from .layers import PruneLayers, find_blocks

__all__ = ["PruneChannels", "ShowGroups", "ChannelGroup", "analyze_groups", "PruneLayers", "find_blocks"]
