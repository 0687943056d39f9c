"""Preprocessing: one documented recipe that turns a screen into FCR-ready data."""

from ._recipe import prepare_screen

__all__ = ["prepare_screen"]
