"""kvpack.client"""
