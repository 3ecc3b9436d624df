"""kvpack.bench"""
