"""ament_python package; also pip-installable where ROS is not sourced."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "bms_ai"


def files(pattern: str) -> list[str]:
    return [f for f in glob(pattern, recursive=True) if "." in f.rsplit("/", 1)[-1]]


def tree(folder: str) -> list[tuple[str, list[str]]]:
    """data_files entries mirroring a folder under share/bms_ai (subfolders kept)."""
    out: dict[str, list[str]] = {}
    for f in files(folder + "/**/*"):
        out.setdefault("share/" + PACKAGE + "/" + f.rsplit("/", 1)[0], []).append(f)
    return sorted(out.items())


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + PACKAGE]),
        ("share/" + PACKAGE, ["package.xml"]),
        ("share/" + PACKAGE + "/launch", files("launch/*.py")),
        ("share/" + PACKAGE + "/config", files("config/*.yaml")),
        ("share/" + PACKAGE + "/config/vehicles", files("config/vehicles/*.yaml")),
        ("share/" + PACKAGE + "/dbc", files("dbc/*.dbc")),
        *tree("models"),
        *tree("data/drives"),
    ],
    # data read at run time from inside the package (OCV tables, drive cycles)
    package_data={PACKAGE: ["chemistry/data/*", "sim/data/*", "sim/data/*/*", "fleet/data/cells/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "python-can>=4.3",
        "cantools>=39",
        "onnxruntime>=1.17",
        "PyYAML>=6",
        "mcap>=1.1",
        "zstandard>=0.21",
        "paho-mqtt>=2.0",
        "psutil>=5.9",
        "msgpack>=1.0",  # python-can udp_multicast (virtual CAN across processes)
        "can-isotp>=2.0",  # ISO-TP for diagnostic polling (bms_ai.can.uds)
        "udsoncan>=1.21",  # UDS service and response-code tables for it
        "tuf>=6",  # signed model updates (bms_ai.fleet.updater: ngclient with its urllib3 fetcher)
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3.5", "hypothesis>=6.80", "ruff>=0.5", "wheel", "mcap-ros2-support>=0.5",
                 "boto3>=1.28", "moto[s3,server]>=5.0", "aiohttp>=3.9"],  # aiohttp: as in "server"
        "train": ["pybamm==26.10.1.1", "pyarrow>=14", "onnx>=1.15", "matplotlib>=3.7", "scipy>=1.10", "torch==2.13.0"],
        "s3": ["boto3>=1.28"],
        "server": ["aiohttp>=3.9"],  # `bms-ai ingest-server`, the cloud side
        "fleet": ["ray[data]>=2.40", "pyarrow>=14", "boto3>=1.28"],  # `bms-ai fleet` pipeline, the cloud side
    },
    zip_safe=True,
    maintainer="bms_ai developers",
    maintainer_email="dev@bms-ai.invalid",
    description="AI battery management for vehicles as a ROS 2 package.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "bms-ai = bms_ai.cli:main",
            "can_bridge = bms_ai.nodes.can_bridge:main",
            "estimator = bms_ai.nodes.estimator:main",
            "fault_monitor = bms_ai.nodes.fault_monitor:main",
            "cloud_uploader = bms_ai.nodes.cloud_uploader:main",
            "model_updater = bms_ai.nodes.model_updater:main",
            "consumer_example = bms_ai.nodes.consumer_example:main",
        ],
    },
)
