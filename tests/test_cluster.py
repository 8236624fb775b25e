import socket

import ray


def test_local_ray_is_on_loopback_with_dashboard_off(ray_local):
    nodes = ray.nodes()
    assert len(nodes) == 1
    assert nodes[0]["NodeManagerAddress"] == "127.0.0.1"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert ray.cluster_resources()["CPU"] == 4
    # no dashboard: nothing answers on the dashboard's default port

    with socket.socket() as s:
        s.settimeout(0.5)
        assert s.connect_ex(("127.0.0.1", 8265)) != 0
