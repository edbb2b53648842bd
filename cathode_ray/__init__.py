"""cathode_ray: distributed E_hull screening of Li-ion cathode candidates.

Stages, data flowing one way: ``data`` -> ``model`` -> ``train`` -> ``calibrate`` -> ``screen`` ->
``report``. Only ``train.ray_ensemble`` and ``screen`` import ray.
"""

__version__ = "0.1.0"
