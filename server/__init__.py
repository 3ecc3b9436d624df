"""kvpack.server"""
