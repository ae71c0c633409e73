{#- qubes-fwupd in dom0: the package, the UpdateVM's tag, the config (remotes and their
    signer pins) and the unattended policy from pillar, and the timer if pillar says so.
    Apply: sudo qubesctl state.apply qubes-fwupd.dom0
    Pillar (see pillar.example): qubes-fwupd:updatevm, :usbvm, :remotes, :unattended,
    :timer. Every file named here is one the qubes-fwupd-dom0 package installs. -#}
{%- set fw = salt['pillar.get']('qubes-fwupd', {}) %}
{%- set updatevm = fw.get('updatevm', 'sys-firewall') %}
{%- set usbvm = fw.get('usbvm', 'sys-usb') %}
{#- remote sections replace the built-in list: the LVFS is written too, unless the pillar
    says lvfs: false (its signers are then the built-in pins) #}
{%- set remotes = fw.get('remotes', {}) %}

qubes-fwupd-dom0-installed:
  pkg.installed:
    - name: qubes-fwupd-dom0

# the policy lets only a tagged qube push downloads to dom0: the UpdateVM, and each qube a
# remote names for its own downloads
{%- set own = remotes.values() | selectattr('updatevm', 'defined') | map(attribute='updatevm') %}
{%- for qube in ([updatevm] + own | list) | unique %}

qubes-fwupd-updatevm-tag-{{ qube }}:
  qvm.tags:
    - name: {{ qube }}
    - add:
      - fwupd-updatevm
{%- endfor %}

qubes-fwupd-config:
  file.managed:
    - name: /etc/qubes-fwupd/qubes-fwupd.conf
    - user: root
    - group: root
    - mode: '0644'
    - require:
      - pkg: qubes-fwupd-dom0-installed
    - contents: |
        # written by the qubes-fwupd Salt state from pillar: edit the pillar, not this file
        [qubes-fwupd]
        updatevm = {{ updatevm }}
        usbvm = {{ usbvm }}
{%- if remotes and fw.get('lvfs', True) and 'lvfs' not in remotes %}

        [remote lvfs]
        metadata_url = https://cdn.fwupd.org/downloads/firmware.xml.zst
        firmware_base_uri = https://fwupd.org/downloads
{%- endif %}
{%- for id, remote in remotes.items() %}

        [remote {{ id }}]
        metadata_url = {{ remote['metadata_url'] }}
{%- if remote.get('firmware_base_uri') %}
        firmware_base_uri = {{ remote['firmware_base_uri'] }}
{%- endif %}
        metadata_signers =
{%- for signer in remote['metadata_signers'] %}
            {{ signer }}
{%- endfor %}
        payload_anchors = {{ remote['payload_anchors'] | join(' ') }}
{%- if remote.get('payload_signers') %}
        payload_signers =
{%- for signer in remote['payload_signers'] %}
            {{ signer }}
{%- endfor %}
{%- endif %}
{%- if remote.get('updatevm') %}
        updatevm = {{ remote['updatevm'] }}
{%- endif %}
{%- if remote.get('heads_components') %}
        heads_components = {{ remote['heads_components'] | join(' ') }}
{%- endif %}
{%- endfor %}

qubes-fwupd-unattended:
  file.managed:
    - name: /etc/qubes-fwupd/unattended.conf
    - user: root
    - group: root
    - mode: '0644'
    - require:
      - pkg: qubes-fwupd-dom0-installed
    - contents: |
        # written by the qubes-fwupd Salt state from pillar: edit the pillar, not this file
        [unattended]
{%- for key, value in fw.get('unattended', {}).items() %}
        {{ key }} = {{ value if value is string else value | join(' ') }}
{%- endfor %}

{%- if fw.get('timer', False) %}

qubes-fwupd-timer:
  service.enabled:
    - name: qubes-fwupd-refresh.timer
    - require:
      - pkg: qubes-fwupd-dom0-installed
{%- endif %}
