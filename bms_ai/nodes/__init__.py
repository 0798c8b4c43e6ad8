"""Thin rclpy adapters: subscriptions, timers, parameters, publishing.

Every node module exposes ``NODE_CLASS`` (an rclpy Node subclass whose
constructor takes rclpy Node keyword arguments) and ``main(args=None)``.
:mod:`bms_ai.graph` composes them; the logic lives in the library.
"""
