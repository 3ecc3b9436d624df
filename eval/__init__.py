"""kvpack.eval"""
